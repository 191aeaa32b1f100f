"""Full-depth rrt parameters -> a Hugging Face directory (config.json, safetensors, tokenizer files): the inverse of
`rrt.formats.hf`.

A (relaxed) recursive model is first expanded by `rrt.convert.expand`: depth position l gets W'_{slot(l)} + s * a_l b_l
and its own norms and biases, so the export is an ordinary L-layer checkpoint of the source family that
`transformers.AutoModelForCausalLM`, lm-eval's `hf` model and vLLM load with no rrt code.

Design notes.
* config.json starts from the original Hugging Face config when the model's lineage leads to one (an rrt dir's or a
  training workdir's `conversion.source` / `expanded_from`, followed like `formats.max_positions` does), so fields
  rrt does not model (token ids, dropout, initializer range) survive; every architecture field is then overwritten
  from the ModelConfig. Without one it is built from scratch.
* The written config is read back with `hf.config_from_hf` and must give the same ModelConfig: a model whose
  switches the family cannot express (a Llama with a norm offset, a NeoX with grouped KV heads) is refused here,
  naming the fields, rather than exported as a checkpoint that silently computes something else.
* Tensor names and layouts are exactly those `hf._plan` reads: kernels transposed back to torch's [out, in], and
  NeoX's q, k, v fused into `query_key_value` with rows grouped per head ([N, 3, H] rows, HF's interleaved layout).
* safetensors is written by hand (8-byte little-endian header length, JSON header, raw little-endian data), one
  tensor at a time, so bfloat16 (which safetensors' numpy backend cannot write) needs no torch; files above
  `max_shard_bytes` are split into HF's `model-0000i-of-0000n.safetensors` with a `model.safetensors.index.json`.
"""

import dataclasses
import json
import os
import sys
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from rrt import model
from rrt.formats import hf

# ModelConfig.family -> HF model_type.
MODEL_TYPES = {
    "llama": "llama",
    "gemma": "gemma",
    "neox": "gpt_neox",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "olmo2": "olmo2",
    "mistral": "mistral",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
# Our activation -> the transformers ACT2FN name the loader maps back to it.
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
DTYPES = {"float32": (np.float32, "F32"), "bfloat16": (ml_dtypes.bfloat16, "BF16"), "float16": (np.float16, "F16")}
# Fields of an original config.json that no longer describe the exported weights.
# (`rope_scaling` and a top-level `original_max_position_embeddings` would override the `rope_parameters` written.)
DROPPED = (
    "quantization_config",
    "auto_map",
    "_name_or_path",
    "transformers_version",
    "rope_scaling",
    "original_max_position_embeddings",
    "sliding_window_pattern",  # Gemma 2/3: `layer_types` is written
    "rope_local_base_freq",  # Gemma 3: rope_parameters["sliding_attention"] is written
)
DEFAULT_POSITIONS = 2048  # when nothing in the lineage declares a context length (LlamaConfig's default)


def model_type(cfg: model.ModelConfig) -> str:
    if cfg.family not in MODEL_TYPES:
        raise ValueError(f"cannot export family {cfg.family!r} to Hugging Face; supported: {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[cfg.family]


def hf_config(
    cfg: model.ModelConfig,
    dtype: str = "float32",
    max_positions: int | None = None,
    base: dict | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> dict:
    """The config.json of the full-depth model `cfg`, starting from `base` (an original config.json) if given."""
    if cfg.n_loops != 1 or cfg.relaxed or cfg.per_position_norms:
        raise ValueError("hf_config takes a full-depth vanilla model: expand a recursive one first (convert.expand)")
    kind = model_type(cfg)
    out = {k: v for k, v in (base or {}).items() if k not in DROPPED}
    if out.get("model_type", kind) != kind:
        out = {}  # the lineage changed family (cannot happen via rrt.convert); build from scratch
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling != "none":
        rope.update(rope_type=cfg.rope_scaling, factor=float(cfg.rope_factor))
    if cfg.rope_scaling == "llama3":
        rope.update(
            low_freq_factor=float(cfg.rope_low_freq_factor),
            high_freq_factor=float(cfg.rope_high_freq_factor),
            original_max_position_embeddings=int(cfg.rope_original_positions),
        )
    out.update(
        architectures=[hf.FAMILIES[kind]],
        model_type=kind,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        hidden_act=HF_ACTIVATIONS[cfg.act],
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=int(max_positions or out.get("max_position_embeddings") or DEFAULT_POSITIONS),
        rope_theta=float(cfg.rope_theta),  # the pre-transformers-5 key, for older readers
        torch_dtype=dtype,
        dtype=dtype,
    )
    if kind == "gpt_neox":
        rope["partial_rotary_factor"] = float(cfg.rotary_pct)
        out.update(
            rotary_pct=float(cfg.rotary_pct),
            rotary_emb_base=float(cfg.rope_theta),
            layer_norm_eps=cfg.norm_eps,
            use_parallel_residual=cfg.parallel_residual,
            attention_bias=cfg.attn_bias,
        )
    else:
        if cfg.rotary_pct != 1.0:
            rope["partial_rotary_factor"] = float(cfg.rotary_pct)
        out.update(
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            rms_norm_eps=cfg.norm_eps,
            attention_bias=cfg.attn_bias,
        )
        if kind in hf.GEMMAS:
            out["hidden_activation"] = HF_ACTIVATIONS[cfg.act]
        if kind in ("gemma2", "gemma3_text"):
            out.update(
                layer_types=list(cfg.layer_types) or ["full_attention"] * cfg.n_layers,
                sliding_window=cfg.sliding_window or None,
                query_pre_attn_scalar=_int_if_whole(cfg.query_scalar or cfg.head_dim),  # an int field
                attn_logit_softcapping=cfg.attn_soft_cap or None,
                final_logit_softcapping=cfg.final_soft_cap or None,
            )
        elif kind == "mistral":
            out["sliding_window"] = cfg.sliding_window or None
        elif kind == "llama":
            out["mlp_bias"] = cfg.mlp_bias
        elif kind == "qwen2":  # q, k, v biases are built in
            del out["attention_bias"]
        if kind in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
    out["rope_parameters"] = rope
    if kind == "gemma3_text":  # per layer type; local layers unscaled with their own base
        local = {"rope_type": "default", "rope_theta": float(cfg.rope_local_theta or cfg.rope_theta)}
        out["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    for kind_, i in (("bos", bos_id), ("eos", eos_id)):
        if i is not None:
            out[f"{kind_}_token_id"] = int(i)
    _check_round_trip(cfg, out)
    return dict(sorted(out.items()))


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _check_round_trip(cfg: model.ModelConfig, written: dict) -> None:
    """The loader must read `written` back as `cfg` (compute fields aside), or the export would compute another
    function: refuse, naming the fields the family cannot express."""
    back = hf.config_from_hf(written, "the exported config.json")
    want = dataclasses.replace(cfg, dtype=back.dtype, remat=back.remat)
    bad = [
        f"{f.name}={getattr(want, f.name)!r} (a {written['model_type']} config.json gives {getattr(back, f.name)!r})"
        for f in dataclasses.fields(want)
        if getattr(want, f.name) != getattr(back, f.name)
    ]
    if bad:
        raise ValueError(f"this {cfg.family} model cannot be written as a Hugging Face checkpoint: {'; '.join(bad)}")


def tensors(cfg: model.ModelConfig, params: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, torch-layout array) for every tensor of the full-depth model, in `hf._plan`'s names."""
    neox = cfg.family == "neox"
    root = "gpt_neox." if neox else "model."
    yield root + ("embed_in" if neox else "embed_tokens") + ".weight", params["embed"]
    names, norms = hf.layer_names(cfg)
    n, h, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    for i in range(cfg.n_layers):
        pre = f"{root}layers.{i}."
        if neox:  # q, k, v [D, N*H] -> rows [N, 3, H] of the fused [3*N*H, D] kernel
            qkv_3xNHxD = np.stack([params[f"layers/{p}"][i].T.reshape(n, h, d) for p in "qkv"], axis=1)
            yield pre + "attention.query_key_value.weight", qkv_3xNHxD.reshape(3 * n * h, d)
            if cfg.attn_bias:
                bias_Nx3xH = np.stack([params[f"layers/{p}_bias"][i].reshape(n, h) for p in "qkv"], axis=1)
                yield pre + "attention.query_key_value.bias", bias_Nx3xH.reshape(3 * n * h)
        for ours, theirs in names.items():
            yield pre + theirs + ".weight", params[f"layers/{ours}"][i].T
            if f"layers/{ours}_bias" in params:
                yield pre + theirs + ".bias", params[f"layers/{ours}_bias"][i]
        for ours, theirs in norms.items():
            yield pre + theirs + ".weight", params[f"layers/{ours}"][i]
            if f"layers/{ours}_bias" in params:
                yield pre + theirs + ".bias", params[f"layers/{ours}_bias"][i]
    yield root + ("final_layer_norm" if neox else "norm") + ".weight", params["final_norm"]
    if cfg.norm == "layer":
        yield root + "final_layer_norm.bias", params["final_norm_bias"]
    if not cfg.tie_embeddings:
        yield ("embed_out.weight" if neox else "lm_head.weight"), params["head"].T


def _write_safetensors(file: str, named: list[tuple[str, np.ndarray]], code: str) -> None:
    header, offset = {}, 0
    for name, x in named:
        header[name] = {"dtype": code, "shape": list(x.shape), "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without a known format
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data, as safetensors itself does
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, x in named:
            f.write(np.ascontiguousarray(x).tobytes())


def write_weights(path: str, cfg: model.ModelConfig, params: dict, dtype: str, max_shard_bytes: int) -> list[str]:
    """Writes model.safetensors (or shards and their index) under `path`; returns the file names."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors is little-endian; writing it from a big-endian host is not supported")
    if dtype not in DTYPES:
        raise ValueError(f"unknown export dtype {dtype!r}; expected one of {list(DTYPES)}")
    np_dtype, code = DTYPES[dtype]
    shards, size = [[]], 0
    for name, x in tensors(cfg, params):
        x = np.asarray(x, dtype=np_dtype)  # native order: little-endian on every host jax runs on
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, x))
        size += x.nbytes
    if len(shards) == 1:
        _write_safetensors(os.path.join(path, hf.SINGLE), shards[0], code)
        return [hf.SINGLE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, named in zip(files, shards):
        _write_safetensors(os.path.join(path, file), named, code)
        weight_map.update({name: file for name, _ in named})
    total = sum(x.nbytes for named in shards for _, x in named)
    with open(os.path.join(path, hf.INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [*files, hf.INDEX]
