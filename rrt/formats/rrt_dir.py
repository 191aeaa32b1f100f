"""An rrt model directory: what `rrt.convert` writes and `--source <dir>` reads.

    <dir>/rrt_model.json   {"format": 1, "model": ModelConfig fields, "source": ..., "conversion": {...}}
    <dir>/params/          an Orbax checkpoint of the nested parameter tree (float32 unless converted otherwise)
    <dir>/tokenizer/       the source model's tokenizer, saved by rrt.formats.tokenizer

A training workdir is read the same way: train writes `rrt_model.json` at its root and Orbax steps below it; the
newest complete step's parameters are loaded (see rrt.train_state).
"""

import json
import os
from typing import Any

import numpy as np
from etils import epath

from rrt import model as model_lib
from rrt import paths, train_state

META = "rrt_model.json"


def is_rrt_dir(path: str) -> bool:
    """A model directory or training workdir (a local path or a gs:// URL) holding rrt_model.json."""
    return (epath.Path(path) / META).is_file()


def read_meta(path) -> dict[str, Any]:
    """The metadata of a model directory or training workdir (a local path or a gs:// URL)."""
    meta_path = epath.Path(path) / META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read rrt model metadata {meta_path}: {e}") from e
    if meta.get("format") != 1 or "model" not in meta:
        raise ValueError(f"{meta_path} is not an rrt model file (format {meta.get('format')!r})")
    return meta


def save(path: str, cfg: model_lib.ModelConfig, params: dict[str, Any], tokenizer=None, **extra) -> None:
    """Writes a model directory. Refuses to write into a directory that already holds anything."""
    import orbax.checkpoint as ocp

    if os.path.exists(path) and os.listdir(path):
        raise FileExistsError(f"{path} is not empty; refusing to overwrite it")
    os.makedirs(path, exist_ok=True)
    expected = model_lib.param_shapes(cfg)
    if set(expected) != set(params):
        raise ValueError(f"params do not match config: {sorted(set(expected) ^ set(params))}")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(
            os.path.abspath(os.path.join(path, "params")), model_lib.nest({k: np.asarray(v) for k, v in params.items()})
        )
        ckptr.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "tokenizer"))
    meta = {"format": 1, "model": cfg.to_dict(), **extra}
    tmp = os.path.join(path, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(path, META))  # the metadata appears last: its presence marks a complete dir


def load(path: str, dtype=None) -> tuple[model_lib.ModelConfig, dict[str, np.ndarray]]:
    """(config, flat params) of a model directory or of the newest checkpoint of a training workdir."""
    import orbax.checkpoint as ocp

    meta = read_meta(path)
    cfg = model_lib.ModelConfig.from_dict(meta["model"])
    params_dir = epath.Path(path) / "params"
    if not params_dir.is_dir():
        return cfg, train_state.load_params(path, cfg)  # a training workdir
    shapes = model_lib.param_shapes(cfg)
    import jax

    target = model_lib.nest({k: jax.ShapeDtypeStruct(s, np.float32) for k, s in shapes.items()})
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta_tree = ckptr.metadata(paths.orbax_path(params_dir)).item_metadata
            target = jax.tree.map(lambda t, m: jax.ShapeDtypeStruct(t.shape, m.dtype), target, dict(meta_tree))
            tree = ckptr.restore(paths.orbax_path(params_dir), target)
    except Exception as e:  # orbax raises many types; name the directory and the cause
        raise ValueError(f"cannot restore parameters from {params_dir}: {type(e).__name__}: {e}") from e
    params = {k: np.asarray(v, dtype=dtype) if dtype else np.asarray(v) for k, v in model_lib.flatten(tree).items()}
    return cfg, params
