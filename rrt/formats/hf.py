"""Hugging Face checkpoints (config.json + safetensors) -> ModelConfig and flat rrt parameters.

Families: Llama (TinyLlama, SmolLM2, Llama 3.x with its `llama3` RoPE scaling), Mistral (sliding window), Qwen2 /
Qwen2.5, Qwen3, OLMo 2, Gemma 1, Gemma 2 (soft caps, alternating local/global layers, sandwich norms), Gemma 3 text
(`Gemma3ForCausalLM`: qk-norm, 5:1 local/global with two RoPE bases) and GPT-NeoX (Pythia). A config.json field that
would change the function and that rrt does not implement (a Qwen sliding window, another RoPE scaling) is an error
naming it, never ignored. The reader streams: it preallocates the
stacked [L, ...] arrays of `rrt.model.param_shapes(cfg)` and fills them one tensor at a time, so peak memory is about
one copy of the model. Tensors are read zero-copy from a memory map at the offsets in the safetensors header
(`safe_open` first validates the file); this also reads bfloat16, which safetensors' numpy backend cannot.

Torch kernels are [out, in]; ours are [in, out]. NeoX fuses q, k and v into one `query_key_value` whose rows are
grouped per head: viewed as [N, 3, H, D] (transformers: `.view(..., N, 3 * H)` then `chunk(3)` on the last axis).
"""

import json
import os
import re
from collections.abc import Callable

import ml_dtypes
import numpy as np
import safetensors

from rrt import model

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# model_type -> the one architecture we read, and the prefix of its decoder's tensor names.
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# model_type -> ModelConfig.family, where they differ.
FAMILY_OF = {"gpt_neox": "neox", "gemma3_text": "gemma3"}
GEMMAS = ("gemma", "gemma2", "gemma3_text")
# RoPE types (config.json's rope_type) -> ModelConfig.rope_scaling.
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
# Non-parameter buffers some checkpoints carry: rotary caches and NeoX's causal-mask constants.
IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")
# transformers' ACT2FN names -> ours ("gelu" is the exact erf form; the others are the tanh approximation).
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}
ACTIVATIONS["gelu_pytorch_tanh"] = "gelu_tanh"
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


def read_config(path: str) -> dict:
    """The config.json of an HF directory."""
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {CONFIG} (not a Hugging Face model directory)")
    with open(file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e


class _Fields(dict):
    """A config.json dict whose missing required field raises an error naming the file and the field."""

    def __init__(self, hf: dict, where: str):
        super().__init__(hf)
        self.where = where

    def __missing__(self, key):
        raise ValueError(f"{self.where}: required field {key!r} is missing (a {self.get('model_type')!r} config)")


def _rope(hf: dict, default_pct: float) -> dict:
    """The RoPE fields of ModelConfig, read as transformers 5 does (`PreTrainedConfig.convert_rope_params_to_dict`
    and `standardize_rope_params`): a legacy `rope_scaling` dict, when present, replaces `rope_parameters` whole
    (some converted Llama 3 checkpoints hold both: a default `rope_parameters` and the real `llama3` scaling); a
    `rope_theta` it lacks comes from the top level, else 10000; llama3's `original_max_position_embeddings` comes
    from the top level if there, else from the dict, else `max_position_embeddings`."""
    rp = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if "full_attention" in rp:  # per-layer-type nesting: the global layers' (Gemma 3's local ones: `_local_rope`)
        rp = dict(rp["full_attention"])
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"config.json: rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    theta = rp.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    pct = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", default_pct)))
    out = dict(rope_theta=float(theta), rotary_pct=float(pct), rope_scaling=ROPE_TYPES[kind])

    def need(key):
        if rp.get(key) is None:
            raise ValueError(f"config.json: rope type {kind!r} needs the field {key!r} (rope_parameters/rope_scaling)")
        return rp[key]

    if kind in ("linear", "llama3"):
        out["rope_factor"] = float(need("factor"))
    if kind == "llama3":
        out["rope_low_freq_factor"] = float(need("low_freq_factor"))
        out["rope_high_freq_factor"] = float(need("high_freq_factor"))
        original = hf.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings")
        original = original or hf.get("max_position_embeddings")
        if original is None:
            raise ValueError("config.json: rope type 'llama3' needs original_max_position_embeddings")
        out["rope_original_positions"] = int(original)
    return out


def _local_rope(hf: dict) -> float:
    """Gemma 3's local layers' RoPE base: `rope_parameters["sliding_attention"]` (transformers 5), else the legacy
    `rope_local_base_freq`, else 10000 (Gemma3TextConfig's default); only the default (unscaled) type."""
    rp = hf.get("rope_parameters") or {}
    local = dict(rp.get("sliding_attention") or {}) if "full_attention" in rp else {}
    kind = local.get("rope_type", local.get("type", "default"))
    if kind != "default":
        raise ValueError(
            f"config.json: rope type {kind!r} for sliding_attention layers (rope_parameters) is not supported"
        )
    return float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))


def _layer_types(hf: dict, family: str) -> tuple[str, ...]:
    """Gemma 2/3's per-layer attention kinds: `layer_types`, else the configs' defaults (Gemma 2: local, global,
    ...; Gemma 3: `sliding_window_pattern` - 1 local layers, then a global one)."""
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    pattern = 2 if family == "gemma2" else hf.get("sliding_window_pattern") or 6
    kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(hf["num_hidden_layers"])]
    return tuple(kinds)


def _refuse_unimplemented(hf: dict, family: str) -> None:
    """Fields that would change the function and that rrt does not implement: errors naming them."""
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config.json: use_bidirectional_attention is not supported (causal decoders only)")
    if hf.get("use_sliding_window"):
        raise ValueError(f"config.json: use_sliding_window=true is not supported (a {family} with sliding windows)")
    other = sorted({t for t in hf.get("layer_types") or () if t != "full_attention"})
    if family not in ("gemma2", "gemma3_text") and other:  # MistralForCausalLM ignores layer_types: refuse them
        raise ValueError(f"config.json: layer_types {other} are not supported for {family} (only full_attention)")


def _act(hf: dict, family: str) -> str:
    name = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh" if family in GEMMAS else "silu")
    if family == "gemma" and name == "gelu":  # legacy Gemma configs; transformers maps it to the tanh form
        name = "gelu_pytorch_tanh"
    if name not in ACTIVATIONS:
        raise ValueError(
            f"config.json: hidden activation {name!r} is not supported; expected one of {list(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def config_from_hf(hf: dict, where: str = CONFIG) -> model.ModelConfig:
    """Maps a config.json dict to a vanilla ModelConfig; unknown model types or architectures are errors, and so is
    a missing required field (named with `where`, the file it came from)."""
    hf = _Fields(hf, where)
    family = hf.get("model_type")
    archs = hf.get("architectures") or [FAMILIES.get(family)]
    if family not in FAMILIES or archs != [FAMILIES[family]]:
        raise ValueError(
            f"config.json: unsupported model_type {family!r} / architectures {archs}; "
            f"supported: {', '.join(f'{k} ({v})' for k, v in FAMILIES.items())}"
        )
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    common = dict(
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=n,
        d_ff=hf["intermediate_size"],
        act=_act(hf, family),
    )
    _refuse_unimplemented(hf, family)
    if family == "gpt_neox":
        bias = hf.get("attention_bias", True)
        return model.ModelConfig(
            **common,
            n_kv_heads=n,
            head_dim=d // n,
            family="neox",
            norm="layer",
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            gated_mlp=False,
            parallel_residual=hf.get("use_parallel_residual", True),
            attn_bias=bias,
            o_bias=bias,
            mlp_bias=True,
            **_rope(hf, 0.25),
            tie_embeddings=hf.get("tie_word_embeddings", False),
        )
    gemma = family in GEMMAS
    bias = hf.get("attention_bias", False)
    # mlp_bias is a LlamaConfig field only; the other families' MLPs have no biases.
    switches = dict(attn_bias=bias, o_bias=bias, mlp_bias=hf.get("mlp_bias", False) if family == "llama" else False)
    if family == "qwen2":  # biases on q, k, v only, always (Qwen2Attention)
        switches.update(attn_bias=True, o_bias=False)
    if family == "qwen3":
        switches["qk_norm"] = "head"
    if family == "olmo2":
        switches.update(qk_norm="proj", norm_position="post")
    if family == "mistral":  # every layer local (None: none)
        switches["sliding_window"] = hf.get("sliding_window") or 0
    if family in ("gemma2", "gemma3_text"):
        g2 = family == "gemma2"  # the config classes' defaults: Gemma 2 soft-caps, Gemma 3 does not
        switches.update(
            norm_position="sandwich",
            layer_types=_layer_types(hf, family),
            sliding_window=hf.get("sliding_window", 4096) or 0,
            query_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            attn_soft_cap=float(hf.get("attn_logit_softcapping", 50.0 if g2 else None) or 0.0),
            final_soft_cap=float(hf.get("final_logit_softcapping", 30.0 if g2 else None) or 0.0),
        )
    rope = _rope(hf, 1.0)
    if family == "gemma3_text":
        switches.update(qk_norm="head", rope_local_theta=_local_rope(hf))
        if not (hf.get("rope_parameters") or {}).get("full_attention", {}).get("rope_theta", hf.get("rope_theta")):
            rope["rope_theta"] = 1_000_000.0  # Gemma3TextConfig's default global base
    head_dim = hf.get("head_dim") or (256 if gemma else 128 if family == "qwen3" else d // n)  # the classes' defaults
    return model.ModelConfig(
        **common,
        **switches,
        **rope,
        n_kv_heads=hf.get("num_key_value_heads") or n,
        head_dim=head_dim,
        family=FAMILY_OF.get(family, family),
        norm_eps=hf.get("rms_norm_eps", 1e-5 if family == "olmo2" else 1e-6),
        norm_offset=1.0 if gemma else 0.0,
        tie_embeddings=hf.get("tie_word_embeddings", gemma),
        embed_scale=gemma,
    )


def layer_names(cfg: model.ModelConfig) -> tuple[dict[str, str], dict[str, str]]:
    """({our projection: its HF module}, {our norm weight: its HF module}) inside `<root>layers.<i>.`; NeoX's fused
    query_key_value is not among them (the loader and the exporter split and fuse it)."""
    if cfg.family == "neox":
        projs = {"o": "attention.dense", "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}
    else:
        projs = {p: f"self_attn.{p}_proj" for p in "qkvo"} | {p: f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    if cfg.norm_position == "sandwich":  # Gemma 2/3: before and after each sub-block
        norms = {
            "attn_norm": "input_layernorm",
            "attn_post_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
            "mlp_post_norm": "post_feedforward_layernorm",
        }
    elif cfg.norm_position == "post":  # OLMo 2: the norms sit on the sub-blocks' outputs
        norms = {"attn_norm": "post_attention_layernorm", "mlp_norm": "post_feedforward_layernorm"}
    else:
        norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    if cfg.qk_norm != "none":
        norms |= {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
    return projs, norms


# A plan entry: (rrt name, layer index or None, transform of the torch tensor into that slot).
Target = tuple[str, int | None, Callable[[np.ndarray], np.ndarray]]


def _plan(cfg: model.ModelConfig) -> dict[str, tuple[tuple[int, ...], list[Target]]]:
    """{HF tensor name: (expected HF shape, targets)} for every tensor the checkpoint must hold."""
    shapes = model.param_shapes(cfg)
    plan = {}

    def add(hf_name, name, layer=None, transpose=False):
        shape = shapes[name][1:] if layer is not None else shapes[name]
        plan[hf_name] = (shape[::-1] if transpose else shape, [(name, layer, np.transpose if transpose else None)])

    neox = cfg.family == "neox"
    root = "gpt_neox." if neox else "model."
    add(root + ("embed_in" if neox else "embed_tokens") + ".weight", "embed")
    add(root + ("final_layer_norm" if neox else "norm") + ".weight", "final_norm")
    if cfg.norm == "layer":
        add(root + "final_layer_norm.bias", "final_norm_bias")
    if not cfg.tie_embeddings:
        add("embed_out.weight" if neox else "lm_head.weight", "head", transpose=True)
    names, norms = layer_names(cfg)
    n, h, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    for i in range(cfg.n_layers):
        pre = f"{root}layers.{i}."
        for ours, theirs in names.items():
            add(pre + theirs + ".weight", f"layers/{ours}", i, transpose=True)
            if f"layers/{ours}_bias" in shapes:
                add(pre + theirs + ".bias", f"layers/{ours}_bias", i)
        for ours, theirs in norms.items():
            add(pre + theirs + ".weight", f"layers/{ours}", i)
            if f"layers/{ours}_bias" in shapes:
                add(pre + theirs + ".bias", f"layers/{ours}_bias", i)
        if neox:  # fused rows [N, 3, H] -> q, k, v
            qkv = pre + "attention.query_key_value."
            plan[qkv + "weight"] = (
                (3 * n * h, d),
                [
                    (f"layers/{p}", i, lambda w, j=j: w.reshape(n, 3, h, d)[:, j].reshape(n * h, d).T)
                    for j, p in enumerate("qkv")
                ],
            )
            if cfg.attn_bias:
                plan[qkv + "bias"] = (
                    (3 * n * h,),
                    [
                        (f"layers/{p}_bias", i, lambda b, j=j: b.reshape(n, 3, h)[:, j].reshape(n * h))
                        for j, p in enumerate("qkv")
                    ],
                )
    return plan


def _files(path: str) -> list[str]:
    """The safetensors files of a directory: the shards its index names, or model.safetensors."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted(set(weight_map.values()))
    if os.path.isfile(os.path.join(path, SINGLE)):
        return [SINGLE]
    present = sorted(os.listdir(path))
    raise FileNotFoundError(f"{path}: no {SINGLE} or {INDEX} (found {present}); only safetensors checkpoints are read")


class _SafetensorsFile:
    """One validated safetensors file, its tensors read as numpy views of a memory map."""

    def __init__(self, file: str):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: safetensors file listed in the index is missing")
        try:
            with safetensors.safe_open(file, framework="numpy"):  # validates header and size
                pass
        except Exception as e:
            raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from e
        self.file = file
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            self.header = {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
        self.data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n)

    def dtype(self, name: str) -> np.dtype:
        kind = self.header[name]["dtype"]
        if kind not in DTYPES:
            raise ValueError(f"{self.file}: tensor {name!r} has dtype {kind}, not a float type we read")
        return np.dtype(DTYPES[kind])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        begin, end = self.header[name]["data_offsets"]
        return self.data[begin:end].view(self.dtype(name)).reshape(self.shape(name))


def load(path: str, dtype=None) -> tuple[model.ModelConfig, dict[str, np.ndarray]]:
    """(config, flat params) of an HF directory. `dtype=None` keeps each tensor's stored dtype."""
    cfg = config_from_hf(read_config(path), os.path.join(path, CONFIG))
    plan = _plan(cfg)
    shapes = model.param_shapes(cfg)
    files = [_SafetensorsFile(os.path.join(path, f)) for f in _files(path)]
    where = {}
    for f in files:
        for name in f.header:
            if name in plan:
                where[name] = f
            elif not (IGNORED.match(name) or (cfg.tie_embeddings and name in ("lm_head.weight", "embed_out.weight"))):
                raise ValueError(f"{f.file}: unexpected tensor {name!r} for a {cfg.family} model of this config")
    missing = [name for name in plan if name not in where]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{path}: missing tensors {missing[:5]}{more}")

    params = {}
    for hf_name, (hf_shape, targets) in plan.items():
        f = where[hf_name]
        if f.shape(hf_name) != hf_shape:
            raise ValueError(f"{f.file}: tensor {hf_name!r} has shape {f.shape(hf_name)}, expected {hf_shape}")
        value = f.read(hf_name)
        for name, layer, transform in targets:
            if name not in params:
                params[name] = np.empty(shapes[name], dtype=np.dtype(dtype) if dtype is not None else value.dtype)
            piece = transform(value) if transform else value
            if layer is None:
                params[name][...] = piece
            else:
                params[name][layer] = piece
    return cfg, params
