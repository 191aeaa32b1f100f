"""Training checkpoints: an Orbax CheckpointManager over params, optimizer state and the data iterators' state.

Layout of a workdir (a local directory or a gs:// URL: Orbax writes either through etils.epath; on gs:// a step is
complete once its commit_success.txt is written, rather than renamed into place; see rrt.paths):
    <workdir>/rrt_model.json      the model config (written once, at the start of a run; see rrt.formats.rrt_dir)
    <workdir>/tokenizer/          the tokenizer
    <workdir>/checkpoints/<step>/ Orbax items: params, opt_state, meta (step, config fingerprint), data (iterators)

Orbax writes each step into a temporary directory and renames it when complete, so a process killed mid-save
leaves no step that restores wrongly; the manager ignores (and cleans) unfinished ones. Every host's data-iterator
state is gathered to the primary host and saved as one JSON list, so a restart restores each host's own position.
Restoring onto another mesh uses the target shardings of the current run.

A step that fails to restore (a truncated file, a missing item: damage after the save) is reported with its error;
the run resumes from the newest step that restores, the failed newer ones moved, untouched, to
<workdir>/checkpoints_unrestorable/<step>.<time> (`restore_latest`; if none restores, it stops, moving nothing).
A state with a non-finite value is never saved (`save` raises).
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from rrt import model as model_lib
from rrt import paths


def manager(workdir, save_every: int, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The manager of <workdir>/checkpoints (a local path or a gs:// URL: Orbax writes either through epath)."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    return ocp.CheckpointManager(
        paths.workdir_path(workdir) / "checkpoints",
        options=options,
        item_names=("params", "opt_state", "meta", "data"),
    )


def gather_json(state) -> list:
    """Every host's JSON-able state, in process order (an all-gather of the encoded bytes)."""
    if jax.process_count() == 1:
        return [state]
    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    everything = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(everything, lengths.reshape(-1))]


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def save(
    mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict, data_state, force: bool = False
) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started. Async: errors surface at wait/close.
    A parameter or optimizer state holding a NaN or inf raises FloatingPointError instead: no checkpoint is
    non-finite, so the newest one is always a good one."""
    if not force and not mngr.should_save(step):
        return False
    if not bool(_all_finite((params, opt_state))):
        mngr.wait_until_finished()
        raise FloatingPointError(
            f"non-finite parameters or optimizer state after step {step}: not saved. The last good checkpoint "
            f"(step {mngr.latest_step()}) is kept in {mngr.directory}"
        )
    hosts = gather_json(data_state)
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta),
        data=ocp.args.JsonSave({"hosts": hosts}),
    )
    return mngr.save(step, args=args, force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state):
    """(params, opt_state, meta, this host's data state) of `step`, placed with the abstract trees' shardings."""
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        meta=ocp.args.JsonRestore(),
        data=ocp.args.JsonRestore(),
    )
    out = mngr.restore(step, args=args)
    hosts = out["data"]["hosts"]
    if len(hosts) != jax.process_count():
        raise ValueError(
            f"checkpoint step {step} holds data-iterator states of {len(hosts)} hosts; this run has "
            f"{jax.process_count()}: the input pipeline cannot resume exactly on another host count"
        )
    return out["params"], out["opt_state"], out["meta"], hosts[jax.process_index()]


def restore_latest(mngr: ocp.CheckpointManager, abstract_params, abstract_opt_state):
    """`restore` of the newest step that restores, as (step, params, opt_state, meta, data state); None when the
    manager holds no step.

    Steps newer than that one which fail are logged (step and error) and then moved aside to
    <workdir>/checkpoints_unrestorable/<step>.<time> by the primary host (nothing is deleted), so that the run's
    next saves of those step numbers do not collide with them. When no step restores, nothing is moved and the
    error names every step's failure (a resume from scratch would drop the run's log)."""
    failed = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            out = restore(mngr, step, abstract_params, abstract_opt_state)
        except Exception as e:  # noqa: BLE001 -- any damage; named in the warning, the step kept aside
            if isinstance(e, ValueError) and "data-iterator states" in str(e):
                raise  # an intact step of another host count: not damage
            msg = f"checkpoint step {step} does not restore ({type(e).__name__}: {e})"
            logging.warning(msg)
            if jax.process_index() == 0:
                print(f"WARNING: {msg}; trying the previous step", flush=True)
            failed.append((step, msg))
            continue
        for bad, _ in failed:
            src = epath.Path(mngr.directory) / str(bad)
            aside = src.parent.parent / f"{src.parent.name}_unrestorable" / f"{bad}.{time.strftime('%Y%m%dT%H%M%S')}"
            if jax.process_index() == 0:
                aside.parent.mkdir(parents=True, exist_ok=True)
                src.rename(aside)  # on an object store: copied, then deleted
                print(f"WARNING: moved the unrestorable checkpoint step {bad} to {aside}", flush=True)
        if failed:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("rrt_unrestorable_moved")
            mngr.reload()
        return step, *out
    if failed:
        raise RuntimeError(
            f"no checkpoint in {mngr.directory} restores; nothing was moved or deleted:\n  "
            + "\n  ".join(m for _, m in failed)
        )
    return None


def load_params(workdir, cfg: model_lib.ModelConfig, step: int | None = None) -> dict[str, np.ndarray]:
    """The flat parameters of a training workdir's newest (or given) complete step, on the host."""
    mngr = manager(workdir, 1, None, async_save=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no complete checkpoint")
    abstract = model_lib.nest({k: jax.ShapeDtypeStruct(s, np.float32) for k, s in model_lib.param_shapes(cfg).items()})
    tree = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
    mngr.close()
    return {k: np.asarray(v) for k, v in model_lib.flatten(tree).items()}
