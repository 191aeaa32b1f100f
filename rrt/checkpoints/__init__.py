"""Readers of model checkpoints: `load(source)` -> (ModelConfig, flat params) for a GGUF file, a Hugging Face
directory or an rrt checkpoint directory. Params carry the flat names of `rrt.model` and are validated against
`rrt.model.param_shapes(cfg)`; `rrt.model.from_params(cfg, params)` builds the Decoder."""

import os

import numpy as np

from rrt import model
from rrt.checkpoints import gguf, hf


def load(source: str, dtype=None) -> tuple[model.ModelConfig, dict[str, np.ndarray]]:
    """(config, params) from a `.gguf` file, an HF directory (config.json) or an rrt directory (rrt_model.json).
    `dtype` casts every parameter (None keeps the stored dtype; GGUF dequantizes to float32)."""
    if os.path.isfile(source) and source.endswith(".gguf"):
        cfg, params = gguf.load(source, dtype)
    elif os.path.isfile(os.path.join(source, "rrt_model.json")):
        from rrt.checkpoints import rrt_dir

        cfg, params = rrt_dir.load(source, dtype)  # may be recursive / relaxed: param_shapes covers that too
    elif os.path.isfile(os.path.join(source, hf.CONFIG)):
        cfg, params = hf.load(source, dtype)
    elif not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such file or directory")
    else:
        raise ValueError(
            f"{source}: not a checkpoint (expected a .gguf file, or a directory with config.json or rrt_model.json)"
        )
    validate(cfg, params, source)
    return cfg, params


def validate(cfg: model.ModelConfig, params: dict, source: str = "") -> None:
    """Names and shapes must be exactly `rrt.model.param_shapes(cfg)`."""
    expected = model.param_shapes(cfg)
    missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"{source}: parameters do not match the config: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{source}: parameter {name!r} has shape {tuple(params[name].shape)}, expected {shape}")
