"""`python -m rrt.train --config <preset name | config file> --workdir <dir> [--config.x=y ...]`: uptrain.

Reading order: `main` (setup: distributed, mesh, model from the source or the workdir, data, optimizer, restore),
`train_step` (pure: loss, gradients, update), `loop` (steps, checkpoints, logs, evals). Rerunning the same command
resumes from the newest complete checkpoint in the workdir; SIGTERM (preemption) saves one and exits.
"""

import atexit
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from etils import epath
from flax import nnx
from ml_collections import config_dict, config_flags

from rrt import attention as attention_lib
from rrt import config as config_lib
from rrt import convert as convert_lib
from rrt import flops as flops_lib
from rrt import formats, hostmem, losses, metrics_log, paths, train_state, workdir_lock
from rrt import model as model_lib
from rrt import optim as optim_lib
from rrt import sharding as sharding_lib
from rrt.eval import heldout
from rrt.formats import rrt_dir

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
TRAIN_CONFIG = "train_config.json"  # the run's ml_collections config (config.json means a Hugging Face one)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "run directory (a local path or gs://bucket/dir): checkpoints, logs; rerun to resume"
)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    exit_weight: float = 0.0
    log_all_loops: bool = True  # on logged steps, also compute (not train) intermediate loops' losses (exit_weight 0)
    remat_head: bool = False  # recompute each exit's [B, T, V] logits in the backward instead of keeping them
    chunk_tokens: int = 0  # > 0: losses over chunks of this many positions, never the full logits (losses.py)

    def __post_init__(self):
        if not 0 <= self.kd_weight <= 1:
            raise ValueError(f"loss.kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.kd_temperature <= 0:
            raise ValueError(f"loss.kd_temperature must be positive, got {self.kd_temperature}")
        if self.chunk_tokens < 0:
            raise ValueError(f"loss.chunk_tokens must be >= 0 (0: unchunked), got {self.chunk_tokens}")


# ---------------------------------------------------------------------------------------------------------------
# The step.


def loss_fn(
    params,
    teacher_params,
    mb,
    log_loops=True,
    *,
    graphdef,
    teacher_graphdef,
    loss_cfg: LossConfig,
    constrain,
    constrain_hiddens=None,
):
    """Summed (weighted) loss over the micro-batch's tokens, and per-loop summed CE / KL.

    A loop with exit weight 0 is not trained; with `loss_cfg.log_all_loops` its loss is still computed for the log,
    but only when `log_loops` (a traced bool: the training loop sets it on the steps it logs) holds, inside a
    `lax.cond`, so that the other steps skip that head's forward pass (7% of a SmolLM2 step). Unlogged, it is 0."""
    model = nnx.merge(graphdef, params)
    _, hiddens_RxBxTxD = model(
        mb["inputs"], mb["positions"], mb["segment_ids"], return_loop_hiddens=True, constrain_shared=constrain
    )
    if constrain_hiddens is not None:  # keeps the stack's activations batch-sharded (sharding.py, "Activations")
        hiddens_RxBxTxD = constrain_hiddens(hiddens_RxBxTxD)
    mask = mb["loss_mask"]
    teacher_logits = teacher = teacher_h_BxTxD = None
    if loss_cfg.kd_weight > 0:
        teacher = nnx.merge(teacher_graphdef, teacher_params)
        if loss_cfg.chunk_tokens:  # its final hidden state; logits per chunk
            _, teacher_hiddens = teacher(mb["inputs"], mb["positions"], mb["segment_ids"], return_loop_hiddens=True)
            teacher_h_BxTxD = jax.lax.stop_gradient(teacher_hiddens[-1])
        else:
            teacher_logits = jax.lax.stop_gradient(teacher(mb["inputs"], mb["positions"], mb["segment_ids"]))
    weights = losses.loop_weights(model.cfg.n_loops, loss_cfg.exit_weight)
    total, ce, kl = 0.0, [], []

    def loop_loss(h_BxTxD):
        with jax.named_scope("head_loss"):  # the profile's part names (rrt/benchmarks/profile.py)
            return head_loss(h_BxTxD)

    def head_loss(h_BxTxD):
        if loss_cfg.chunk_tokens:
            return losses.chunked_ce_kl(
                model.logits,
                h_BxTxD,
                mb["targets"],
                mask,
                loss_cfg.chunk_tokens,
                teacher.logits if teacher_h_BxTxD is not None else None,
                teacher_h_BxTxD,
                loss_cfg.kd_temperature,
            )
        logits = model.logits(h_BxTxD)
        c = losses.cross_entropy(logits, mb["targets"], mask)
        k = (
            losses.forward_kl(logits, teacher_logits, mask, loss_cfg.kd_temperature)
            if teacher_logits is not None
            else 0.0
        )
        return c, k

    if loss_cfg.remat_head and not loss_cfg.chunk_tokens:  # chunks are rematerialised already
        loop_loss = jax.checkpoint(loop_loss, prevent_cse=False)
    for r, w in enumerate(weights):
        if w == 0 and not loss_cfg.log_all_loops:  # skip the head entirely; logged as 0
            ce.append(jnp.zeros(()))
            kl.append(jnp.zeros(()))
            continue
        if w == 0:  # for the log only, and only on logged steps
            zeros = lambda h: (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))  # noqa: E731
            c, k = jax.lax.cond(
                log_loops,
                lambda h: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), loop_loss(h)),
                zeros,
                jax.lax.stop_gradient(hiddens_RxBxTxD[r]),
            )
            ce.append(c)
            kl.append(k)
            continue
        c, k = loop_loss(hiddens_RxBxTxD[r])
        if w > 0:  # adding 0 * c would still run the head's backward (XLA keeps x * 0 for floats)
            total = total + w * ((1 - loss_cfg.kd_weight) * c + loss_cfg.kd_weight * k)
        ce.append(c)
        kl.append(k)
    return total, (jnp.stack(ce), jnp.stack(jnp.asarray(kl)))


def train_step(params, opt_state, teacher_params, batch, log_loops=True, *, opt, n_micro: int, n_loops: int, **loss_kw):
    """One optimizer step over `n_micro` micro-batches (gradients summed, then divided by the token count).
    `log_loops` (bool, may be traced): whether untrained loops' losses are computed for the log (see `loss_fn`)."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, **loss_kw), has_aux=True)
    micro = jax.tree.map(lambda x: x.reshape((n_micro, x.shape[0] // n_micro) + x.shape[1:]), batch)

    def accumulate(carry, mb):
        grads, loss, ce, kl = carry
        (l, (c, k)), g = grad_fn(params, teacher_params, mb, log_loops)
        return (jax.tree.map(jnp.add, grads, g), loss + l, ce + c, kl + k), None

    r = n_loops
    init = (jax.tree.map(jnp.zeros_like, params), 0.0, jnp.zeros(r), jnp.zeros(r))
    (grads, loss, ce, kl), _ = jax.lax.scan(accumulate, init, micro)
    tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    with jax.named_scope("optimizer"):
        grads = jax.tree.map(lambda g: g / tokens, grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        grad_norm = optax.global_norm(grads)
    metrics = {"loss": loss / tokens, "grad_norm": grad_norm, "tokens": tokens}
    for i in range(r):
        metrics[f"loss/loop{i + 1}"] = ce[i] / tokens
        if loss_kw["loss_cfg"].kd_weight > 0:
            metrics[f"kl/loop{i + 1}"] = kl[i] / tokens
    return params, opt_state, metrics


# ---------------------------------------------------------------------------------------------------------------
# Setup helpers (the ConfigDict stops here: everything below `main` takes typed values).


def recursion_from_config(c: config_dict.ConfigDict, base: model_lib.ModelConfig) -> convert_lib.Recursion:
    full_attn, full_mlp = convert_lib.full_rank(base)
    ppn = {"auto": None, "true": True, "false": False, True: True, False: False}[c.per_position_norms]
    return convert_lib.Recursion(
        loops=c.loops,
        strategy=c.strategy,
        init=c.init,
        rank_attn=full_attn if c.rank_attn == -1 else c.rank_attn,
        rank_mlp=full_mlp if c.rank_mlp == -1 else c.rank_mlp,
        alpha=c.alpha,
        lora_init=c.lora_init,
        per_position_norms=ppn,
        damping=c.damping,
    )


def data_config(c: config_dict.ConfigDict, workdir):
    from rrt.data import documents, pipeline

    sources = []
    for s in config_lib.data_sources(c):
        if s.get("kind") == "tfds" and not s.get("data_dir"):
            if not c.data.data_dir:
                raise ValueError(f"data source {s.get('name')!r} is a TFDS dataset: set --config.data.data_dir")
            s["data_dir"] = c.data.data_dir
        sources.append(documents.SourceConfig(**s))
    return pipeline.DataConfig(
        sources=tuple(sources),
        seq_len=c.data.seq_len,
        global_batch_size=c.data.global_batch_size,
        seed=c.data.seed,
        cache_dir=c.data.cache_dir or str(epath.Path(workdir) / "token_cache"),
        num_workers=c.data.num_workers,
    )


def init_distributed(c: config_dict.ConfigDict) -> None:
    """jax.distributed from the config, or auto-detected: SLURM with >1 task, a GKE TPU pod, a multi-host TPU VM."""
    d = c.distributed
    mode = os.environ.get("RRT_DISTRIBUTED_INIT", d.initialize)  # launch/tpu_pod.py sets "always"
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"distributed.initialize must be auto, always or never, got {mode!r}")
    if d.coordinator_address:
        jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
        return
    env = os.environ
    detected = (
        int(env.get("SLURM_NTASKS", "1")) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env or "TPU_WORKER_HOSTNAMES" in env
    )
    if mode == "always" or (mode == "auto" and detected):
        jax.distributed.initialize()  # reads SLURM_* variables or the TPU metadata server


def place(tree: dict, shardings: dict) -> dict:
    """Host numpy arrays -> global arrays with the given shardings (each host supplies only its shards)."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x[idx])), tree, shardings
    )


def model_config(c: config_dict.ConfigDict, base: model_lib.ModelConfig | None):
    """(model to train, its Recursion or None) from the config and the source's config (None: from scratch)."""
    if base is not None:
        rec = recursion_from_config(c.recursion, base)
        cfg = convert_lib.recursive_config(base, rec)
    else:
        r = c.recursion
        cfg = model_lib.ModelConfig(
            **dict(c.model),
            n_loops=r.loops,
            strategy=r.strategy,
            rank_attn=max(r.rank_attn, 0),
            rank_mlp=max(r.rank_mlp, 0),
            lora_alpha=r.alpha,
        )
        rec = None
    return dataclasses.replace(cfg, dtype=c.dtype, remat=c.remat, attention=c.attention), rec


CALIBRATION_FIELDS = ("calib_data", "calib_tokens", "calib_seq_len", "damping")


def calibration(c: config_dict.ConfigDict, workdir, tokenizer, mesh):
    """The asvd calibration rows: `recursion.calib_data`, else the training data's sources (train splits), in
    rows of `recursion.calib_seq_len` (else data.seq_len), a whole number of batches that the mesh divides."""
    from rrt import calibrate
    from rrt.data import documents

    r = c.recursion
    if r.calib_data:
        sources = [documents.SourceConfig(kind="files", glob=r.calib_data)]
    else:
        sources = list(data_config(c, workdir).sources)
    seq_len = r.calib_seq_len or c.data.seq_len
    batch = calibration_batch(mesh)
    rows = -(-r.calib_tokens // (seq_len * batch)) * batch
    return calibrate.calibration_rows(sources, tokenizer, rows * seq_len, seq_len, seed=c.data.seed), batch


def convert_calibrated(c, base, base_params, rec, tokenizer, mesh=None, progress: bool = True):
    """(recursive config, flat params, report) as `rrt.train` converts its source, asvd calibration included
    (report["calibration"]: its record, or None): the demo and the reproduction evaluate exactly this model."""
    from rrt import calibrate

    moments, record = None, None
    if rec.needs_calibration:
        mesh = mesh if mesh is not None else sharding_lib.make_mesh(tuple(c.mesh))
        calib, batch = calibration(c, "", tokenizer, mesh)
        moments = calibrate.collect_moments(base, base_params, calib, batch_size=batch, mesh=mesh, progress=progress)
        record = calib.record
    cfg, flat, report = convert_lib.convert(base, base_params, rec, progress=progress, moments=moments)
    return cfg, flat, {**report, "calibration": record}


def calibration_batch(mesh, rows: int = 8) -> int:
    """Rows per calibration forward: a multiple of the mesh's batch axes, at least `rows`."""
    n = math.prod(mesh.shape[a] for a in sharding_lib.RULES["batch"])
    return -(-rows // n) * n


def recursion_disagreements(r: config_dict.ConfigDict, src: model_lib.ModelConfig) -> list[str]:
    """The config.recursion fields that neither keep the base config's default nor agree with `src`, a model that
    is recursive already (an rrt directory written by rrt.convert, or a training workdir): trained as it is."""
    defaults = config_lib.get_config().recursion
    full_attn, full_mlp = convert_lib.full_rank(src)
    ppn = {"auto": None, "true": True, "false": False, True: True, False: False}.get(r.per_position_norms, "?")
    have = {
        "loops": (r.loops == src.n_loops, f"n_loops={src.n_loops}"),
        "strategy": (r.strategy == src.strategy, f"strategy={src.strategy!r}"),
        "rank_attn": ((full_attn if r.rank_attn == -1 else r.rank_attn) == src.rank_attn, f"rank_attn={src.rank_attn}"),
        "rank_mlp": ((full_mlp if r.rank_mlp == -1 else r.rank_mlp) == src.rank_mlp, f"rank_mlp={src.rank_mlp}"),
        "alpha": (r.alpha == src.lora_alpha, f"lora_alpha={src.lora_alpha}"),
        "per_position_norms": (ppn is None or ppn == src.per_position_norms, f"{src.per_position_norms}"),
        "init": (False, "no conversion: it is converted already"),
        "lora_init": (False, "no conversion: it is converted already"),
        **{k: (False, "no conversion: it is converted already") for k in CALIBRATION_FIELDS},
    }
    return [f"recursion.{k}={r[k]!r} ({why})" for k, (ok, why) in have.items() if not ok and r[k] != defaults[k]]


def build_model(c, workdir):
    """(model config, source config, source params, recursion, conversion record, teacher (cfg, params) or None).

    A full-depth source is converted (recursion None: trained from scratch when there is no source either); a
    source that is recursive already is trained as it is (recursion None, and `c.recursion` must agree with it or
    keep its defaults). Distillation takes its teacher from `c.teacher`, else the full-depth source; a recursive
    source with no teacher is an error, never a guess."""
    meta_path = epath.Path(workdir) / rrt_dir.META
    source = formats.resolve_source(c.source)
    base = base_params = None
    if source:
        base, base_params = formats.load(source)
    recursive_source = base is not None and (base.n_loops != 1 or base.relaxed)
    if recursive_source:
        bad = recursion_disagreements(c.recursion, base)
        if bad:
            raise ValueError(
                f"{c.source} holds a recursive model ({base.n_shared} shared layers x {base.n_loops} loops, ranks "
                f"{base.rank_attn}/{base.rank_mlp}), trained as it is; these config fields disagree with it: "
                f"{'; '.join(bad)}. Leave them at their defaults or match the source"
            )
        cfg, rec = dataclasses.replace(base, dtype=c.dtype, remat=c.remat, attention=c.attention), None
    else:
        cfg, rec = model_config(c, base)
    conversion = {
        "source": os.path.abspath(source) if source else "",
        "recursion": dataclasses.asdict(rec) if rec else None,
    }
    teacher_source = formats.resolve_source(c.teacher)
    if teacher_source:
        conversion["teacher"] = os.path.abspath(teacher_source)
    if meta_path.exists():
        meta = rrt_dir.read_meta(workdir)
        stored = model_lib.ModelConfig.from_dict(meta["model"])
        strip = lambda m: dataclasses.replace(m, dtype="float32", remat="none", attention="auto")  # noqa: E731
        stored_conversion = meta.get("conversion")
        if isinstance(stored_conversion, dict):  # its asvd calibration record is checked where it is computed
            stored_conversion = {k: v for k, v in stored_conversion.items() if k != "calibration"}
        if strip(stored) != strip(cfg) or stored_conversion != conversion:
            raise ValueError(
                f"{workdir} holds a run of a different model or conversion ({meta_path}); use a new --workdir"
            )
    teacher = None
    if c.loss.kd_weight > 0:
        if teacher_source:
            teacher = formats.load(teacher_source)
            if teacher[0].vocab_size != cfg.vocab_size:
                raise ValueError(
                    f"config.teacher {c.teacher} has {teacher[0].vocab_size} tokens, the trained model "
                    f"{cfg.vocab_size}: distillation needs the same vocabulary"
                )
        elif base is None:
            raise ValueError(
                "loss.kd_weight > 0 needs a model to distil from: config.source is empty; set --config.teacher"
            )
        elif recursive_source:
            raise ValueError(
                f"loss.kd_weight > 0 but config.source {c.source} is recursive already, so it is no teacher; name "
                "the full-depth model to distil from with --config.teacher=<HF dir | .gguf | rrt dir | smollm2>"
            )
        else:
            teacher = (base, base_params)
    elif teacher_source:
        raise ValueError(f"config.teacher={c.teacher!r} is set but loss.kd_weight is 0: nothing would distil from it")
    return cfg, base, base_params, rec, conversion, teacher


def record_config(workdir, config_json: str) -> str | None:
    """Writes the run's config to <workdir>/train_config.json, on every start that gets as far as training (so it
    names what the run writing the checkpoints uses). A different earlier one is kept as
    train_config.<its mtime>.json (returned), never overwritten."""
    workdir = epath.Path(workdir)
    path = workdir / TRAIN_CONFIG
    kept = None
    if path.exists():
        if path.read_text() == config_json:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(path.stat().mtime))
        kept, n = workdir / f"train_config.{stamp}.json", 1
        while kept.exists():
            kept, n = workdir / f"train_config.{stamp}.{n}.json", n + 1
        path.rename(kept)
    paths.write_atomic(path, config_json)
    return str(kept) if kept is not None else None


def save_tokenizer(tokenizer, path: epath.Path) -> None:
    """`tokenizer.save` (local files) into `path`, a local directory or, through a local copy, a gs:// one."""
    if not paths.is_url(path):
        tokenizer.save(str(path))
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        path.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(tmp)):
            paths.write_atomic(path / name, epath.Path(tmp, name).read_bytes())


def under_mesh(mesh, fn, **kw):
    """`fn` with `kw` bound, traced with the mesh's abstract mesh in context: shard_map'd kernels (splash attention)
    find the mesh there, and attention="auto" resolves for the mesh's platform, so a TPU step compiled ahead of time
    on a CPU host (rrt.aot) gets splash (rrt/attention.py)."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kw, **kwargs)

    return traced


def build_step(c, cfg: model_lib.ModelConfig, teacher_cfg: model_lib.ModelConfig | None, mesh):
    """Everything about the train step that needs no data or weights: the abstract parameters, the optimizer, the
    shardings of parameters, optimizer state and teacher, and the jitted step. `rrt.train.main` trains with it;
    `rrt.aot` compiles it for a TPU topology from abstract arrays (one code path, so what fits there runs here)."""
    loss_cfg = LossConfig(
        c.loss.kd_weight,
        c.loss.kd_temperature,
        c.loss.exit_weight,
        c.loss.log_all_loops,
        c.remat != "none",
        c.loss.chunk_tokens,
    )
    if c.attention == "splash" and attention_lib.splash_block(c.data.seq_len) is None:  # else it would run xla
        raise ValueError(f"attention='splash' needs rows of a multiple of 128 tokens; data.seq_len={c.data.seq_len}")
    opt_cfg = optim_lib.OptimConfig(**{k: v for k, v in c.optim.items()}, total_steps=c.steps)
    graphdef, abstract_state = nnx.split(model_lib.abstract(cfg))
    abstract_params = nnx.to_pure_dict(abstract_state)
    param_sh = sharding_lib.param_shardings(abstract_params, mesh)
    opt, schedules = optim_lib.make(opt_cfg, abstract_params)
    # Optimizer-state shardings follow the parameters' (sharding.opt_state_shardings says why they are explicit).
    abstract_opt = jax.eval_shape(opt.init, abstract_params)
    opt_sh = sharding_lib.opt_state_shardings(opt, abstract_opt, param_sh, mesh)
    teacher_graphdef = teacher_abstract = teacher_sh = None
    if teacher_cfg is not None:
        teacher_cfg = dataclasses.replace(teacher_cfg, dtype=c.dtype, attention=c.attention)
        teacher_graphdef, t_state = nnx.split(model_lib.abstract(teacher_cfg))
        teacher_abstract = nnx.to_pure_dict(t_state)
        teacher_sh = sharding_lib.param_shardings(teacher_abstract, mesh)
    constrain = sharding_lib.shared_gather_constraint(mesh) if c.gather_shared else None
    step_fn = jax.jit(
        under_mesh(
            mesh,
            train_step,
            opt=opt,
            n_micro=c.grad_accum,
            n_loops=cfg.n_loops,
            graphdef=graphdef,
            teacher_graphdef=teacher_graphdef,
            loss_cfg=loss_cfg,
            constrain=constrain,
            constrain_hiddens=sharding_lib.activation_constraint(mesh, (None, "batch", "time", None)),
        ),
        # Outputs keep the inputs' shardings: otherwise XLA picks its own, the second step recompiles and the
        # parameters drift away from the rules table (and from what a restore expects).
        out_shardings=(param_sh, opt_sh, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())),
        donate_argnums=(0, 1),
    )
    return types.SimpleNamespace(
        loss_cfg=loss_cfg,
        graphdef=graphdef,
        abstract_params=abstract_params,
        param_sh=param_sh,
        opt=opt,
        schedules=schedules,
        abstract_opt=abstract_opt,
        opt_sh=opt_sh,
        teacher_cfg=teacher_cfg,
        teacher_graphdef=teacher_graphdef,
        teacher_abstract=teacher_abstract,
        teacher_sh=teacher_sh,
        step_fn=step_fn,
    )


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def require_source(c: config_dict.ConfigDict) -> None:
    """A preset that converts a pretrained model leaves `config.source` as a placeholder (None) for the user's path:
    training refuses to start without it ("" is the explicit choice of a scratch model)."""
    if c.source is None:
        arch = (c.get("arch") or {}).get("architectures") or ["a pretrained model"]
        raise app.UsageError(
            f"config.source is unset: this preset converts {arch[0]}; pass --config.source=<HF dir | .gguf | rrt dir>"
            " (or --config.source= to train c.model from scratch)"
        )


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    c = _CONFIG.value
    require_source(c)
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:  # a local path made absolute; gs://bucket/dir kept a URL (rrt.paths: the one path layer)
        workdir = paths.workdir_path(_WORKDIR.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    init_distributed(c)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        try:  # held until this process exits, however it exits (a gs:// lock expires if it is killed)
            lock = workdir_lock.acquire(workdir)
        except workdir_lock.WorkdirInUse as e:
            raise SystemExit(f"error: {e}") from None
        atexit.register(workdir_lock.release, lock)
    mesh = sharding_lib.make_mesh(tuple(c.mesh))
    cfg, base, base_params, rec, conversion, teacher = build_model(c, workdir)
    if c.source:  # RoPE: past the source's declared context is a warning (formats.check_positions)
        formats.check_positions(c.data.seq_len, formats.resolve_source(c.source), "data.seq_len")
    if c.data.global_batch_size % c.grad_accum:
        raise ValueError(
            f"data.global_batch_size={c.data.global_batch_size} is not divisible by grad_accum={c.grad_accum}"
        )

    st = build_step(c, cfg, teacher[0] if teacher is not None else None, mesh)
    graphdef, param_sh, opt_sh, opt, schedules = st.graphdef, st.param_sh, st.opt_sh, st.opt, st.schedules
    mngr = train_state.manager(workdir, c.checkpoint_every, c.keep_checkpoints, c.async_checkpoint)
    latest = mngr.latest_step()

    tokenizer_source = formats.resolve_source(c.source or c.tokenizer)
    from rrt.formats import tokenizer as tokenizer_lib

    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_source)
    from rrt.data import pipeline

    formats.check_vocab(tokenizer, cfg, tokenizer_source)
    calib = None
    if rec is not None and rec.needs_calibration and latest is None:  # asvd: rows now, their record in the meta
        calib, calib_batch = calibration(c, workdir, tokenizer, mesh)
        conversion = {**conversion, "calibration": calib.record}
        stored = rrt_dir.read_meta(workdir).get("conversion") if (workdir / rrt_dir.META).exists() else None
        if stored is not None and stored.get("calibration") != calib.record:
            raise ValueError(
                f"{workdir} was started with other asvd calibration data ({rrt_dir.META}: calibration); "
                "use a new --workdir or the same recursion.calib_* settings"
            )
    if jax.process_index() == 0 and not (workdir / rrt_dir.META).exists():
        save_tokenizer(tokenizer, workdir / "tokenizer")
        # the kernel is the platform's choice, not the model's: a CPU evaluation of this run must not get splash
        meta = {"format": 1, "model": dataclasses.replace(cfg, attention="auto").to_dict(), "conversion": conversion}
        paths.write_atomic(workdir / rrt_dir.META, json.dumps(meta, indent=2))

    with_sh = lambda t, s: jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t, s)  # noqa: E731
    init_fn = jax.jit(opt.init, out_shardings=opt_sh)

    restored = None
    if latest is not None:  # the newest step that restores; damaged ones are named and moved aside
        restored = train_state.restore_latest(
            mngr, with_sh(st.abstract_params, param_sh), with_sh(st.abstract_opt, opt_sh)
        )
    if restored is not None:
        _, params, opt_state, meta, data_state = restored
        step = int(meta["step"])
        _log(f"resumed from step {step} of {workdir}")
    else:
        if rec is not None:
            moments = None
            if calib is not None:
                from rrt import calibrate

                t0 = time.perf_counter()
                moments = calibrate.collect_moments(
                    base, base_params, calib, batch_size=calib_batch, mesh=mesh, progress=jax.process_index() == 0
                )
                _log(
                    f"calibrated the asvd LoRA init on {calib.record['tokens']:,} tokens "
                    f"in {time.perf_counter() - t0:.1f} s"
                )
            _, flat, report = convert_lib.convert(
                base, base_params, rec, progress=jax.process_index() == 0, moments=moments
            )
            del moments
            _log(
                f"converted {c.source} -> {cfg.n_shared} x {cfg.n_loops} ({rec.strategy}, {rec.init}): "
                f"{report['params']}"
            )
        elif base is not None:  # a recursive source: trained as it is
            flat = base_params
            _log(f"training {c.source} as it is ({cfg.n_shared} x {cfg.n_loops}); no conversion")
        else:
            flat = model_lib.flat_params(model_lib.Decoder(cfg, rngs=nnx.Rngs(c.seed)))
        params = place(model_lib.nest({k: np.asarray(v, np.float32) for k, v in flat.items()}), param_sh)
        opt_state = init_fn(params)
        step, data_state = 0, None

    teacher_params, teacher_cfg = None, st.teacher_cfg
    if teacher is not None:
        teacher_params = place(
            model_lib.nest({k: np.asarray(v, np.float32) for k, v in teacher[1].items()}), st.teacher_sh
        )

    dcfg = data_config(c, workdir)
    iterator = pipeline.make_iterator(dcfg, tokenizer)
    if data_state is not None:
        iterator.set_state(data_state)
    if jax.process_index() == 0:
        record_config(workdir, c.to_json(indent=2))

    step_fn, loss_cfg = st.step_fn, st.loss_cfg
    # model FLOPs: the trained exits' heads (a logged step's forward-only heads for the log are not counted)
    trained_heads = sum(w > 0 for w in losses.loop_weights(cfg.n_loops, loss_cfg.exit_weight))
    flops_per_token = flops_lib.train_flops_per_token(cfg, dcfg.seq_len, trained_heads, teacher_cfg)
    peak, peak_src = (c.peak_flops, "config") if c.peak_flops else flops_lib.peak_flops_per_device(c.dtype)
    _log(f"MFU is measured against {peak:.3g} FLOP/s per device ({peak_src})")
    loop(
        c,
        workdir,
        mesh,
        mngr,
        iterator,
        step_fn,
        params,
        opt_state,
        teacher_params,
        step,
        schedules,
        graphdef,
        tokenizer,
        cfg,
        flops_per_token,
        peak * jax.device_count(),
    )


# ---------------------------------------------------------------------------------------------------------------
# The loop.


class _Preemption:
    """Whether to save and exit after a step. One process: a SIGTERM flag. Several (jax.distributed): JAX's
    preemption sync. SIGTERM reaches hosts at different moments; the coordination service spreads the first notice
    to all hosts and picks one step (the largest any host has reached, plus one) at which every host's
    `reached_preemption_sync_point` returns True, so all hosts save the same step instead of hanging in a
    collective. It must be asked once per step, on every host."""

    def __init__(self):
        from jax._src import distributed

        self.multi = jax.process_count() > 1 and distributed.global_state.client is not None
        self.flag = False
        if not self.multi:  # with jax.distributed, JAX's own SIGTERM notifier is installed; keep it
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.flag = True

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag


def loop(
    c,
    workdir,
    mesh,
    mngr,
    iterator,
    step_fn,
    params,
    opt_state,
    teacher_params,
    step,
    schedules,
    graphdef,
    tokenizer,
    cfg,
    flops_per_token,
    peak_total,
):
    from tqdm import tqdm

    from rrt.data import pipeline

    preemption = _Preemption()
    logger = metrics_log.Logger(workdir, step)
    batch_sh = sharding_lib.batch_sharding(mesh)
    bar = tqdm(total=c.steps, initial=step, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
    last_time, window_tokens = time.perf_counter(), 0.0
    meta = {"config_fingerprint": cfg.to_dict()}
    try:
        while step < c.steps:
            batch = pipeline.to_global(next(iterator), mesh, batch_sh.spec)
            logged = (step + 1) % c.log_every == 0 or step + 1 == c.steps
            new_params, new_opt_state, metrics = step_fn(params, opt_state, teacher_params, batch, np.bool_(logged))
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            # A finite loss with non-finite gradients still turns the parameters into NaN: check both, or the
            # next save would keep them as "the last good checkpoint".
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                mngr.wait_until_finished()
                raise FloatingPointError(
                    f"non-finite loss {loss} or gradient norm {grad_norm} at step {step + 1}; stopping. The last "
                    f"good checkpoint (step {mngr.latest_step()}) is kept in {workdir}/checkpoints"
                )
            params, opt_state, step = new_params, new_opt_state, step + 1
            window_tokens += float(metrics["tokens"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if step % c.log_every == 0 or step == c.steps:
                now = time.perf_counter()
                tok_s = window_tokens / max(now - last_time, 1e-9)
                m = {k: v for k, v in metrics.items() if k != "tokens"}
                m.update(lr=schedules["shared"](step - 1), tokens_per_s=tok_s, mfu=tok_s * flops_per_token / peak_total)
                if "lora" in schedules:
                    m["lr_lora"] = schedules["lora"](step - 1)
                logger.write(step, m)
                last_time, window_tokens = now, 0.0
            if c.eval_every and step % c.eval_every == 0 and step < c.steps:
                logger.write(step, evaluate(c, nnx.merge(graphdef, params), tokenizer, mesh))
            data_state = iterator.get_state()
            preempted = preemption.reached(step)  # once per step, on every host
            final = step == c.steps or preempted
            train_state.save(mngr, step, params, opt_state, {"step": step, **meta}, data_state, force=final)
            if preempted:
                mngr.wait_until_finished()
                # every host says so: which step each saved is what a multi-host preemption must agree on
                print(
                    f"preempted (SIGTERM): checkpoint saved at step {step} (process {jax.process_index()}); rerun the "
                    "same command to resume",
                    flush=True,
                )
                return
        logger.write(step, evaluate(c, nnx.merge(graphdef, params), tokenizer, mesh))
    finally:
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
        logger.close()
        if hasattr(iterator, "close"):
            iterator.close()


def eval_spec(c: config_dict.ConfigDict) -> heldout.Spec:
    """The in-training evaluation (periodic and final) from the config's eval fields."""
    return heldout.Spec(
        seq_len=c.eval.seq_len,
        windows=c.eval.max_windows,
        tasks=tuple(t for t in c.eval.tasks.split(",") if t),
        data_dir=c.eval.data_dir,
        shots=c.eval.shots,
        limit=c.eval.limit,
        batch_size=8,
    )


def evaluate(c, model: model_lib.Decoder, tokenizer, mesh=None) -> dict[str, float]:
    """Held-out perplexity (per loop) and optional few-shot tasks, as flat scalar metrics. Under the training mesh
    (when given), so that splash attention finds a mesh to shard_map over (rrt/attention.py)."""
    texts = heldout.heldout_texts(config_lib.data_sources(c), config_lib.heldout_names(c))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return heldout.flat_metrics(heldout.evaluate(model, tokenizer, eval_spec(c), texts), model.cfg.n_loops)


_HELP = ("-h", "--help", "-?", "--helpshort")


def run():
    if any(a in _HELP for a in sys.argv[1:]):  # absl's --help exits 1 and, under a console script, shows nothing
        print(__doc__)
        print(flags.FLAGS.module_help(__name__))
        return
    hostmem.reexec_with_hugepages()  # once, before anything allocates: rrt/hostmem.py
    config_lib.install_config_flag_resolution()  # --config <preset name> works from any directory
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
