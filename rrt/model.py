"""One Flax NNX decoder for Llama (2, 3.x), Mistral, Qwen2/2.5, Qwen3, OLMo 2, Gemma (1, 2, 3 text) and GPT-NeoX,
vanilla or (relaxed) recursive.

Dimension legend, used in names such as `x_BxTxD`:
  B batch, T query time, S key time (cache length), D model width, N query heads, G key/value heads,
  H head dim, F MLP width, V vocab, L depth positions, K shared layers, R loops (L = K * R), P LoRA rank.

Design notes.
* A vanilla model is the special case K = L, R = 1, rank 0 of the recursive one: there is one code path.
* Parameters (flat names, used by loaders, conversion, checkpoints and the sharding table):
    embed                [V, D]
    layers/<w>           [K, ...]   the shared block weights (q, k, v, o, gate, up, down, biases, norms; with qk-norm
                                    `q_norm`, `k_norm`: [K, H] per head (Qwen3) or [K, N*H] / [K, G*H] (OLMo 2))
    relax/<w>            [L, ...]   per-depth-position weights: LoRA factors `<proj>_a`, `<proj>_b`, and the
                                    vector parameters (norm weights, projection biases) when `per_position_norms`
    final_norm[_bias]    [D]
    head                 [D, V]     untied models only
  Kernels are stored input-first ([I, O]); NeoX's fused QKV is split into q, k, v by its loader.
* The stack is one `lax.scan` over the L = R * K depth positions (xs: the per-position weights and layer ids); the
  shared weights are closed over and picked by the position's layer id, so tracing, compile time and HLO size do
  not depend on R. The scan also keeps the hidden state after every loop, which early-exit losses and per-loop
  evaluation read.
* Norm weights (and NeoX's projection biases): strict recursion (rank 0) shares them with their layer, like every
  other weight. Relaxed models keep them per position by default (`per_position_norms`, set by conversion): a few
  vectors per position (2D parameters per position in total), and what makes a full-rank relaxed model reproduce
  the original exactly (LoRA relaxes matrices, not vectors).
* Attention lives in rrt/attention.py: `attention` picks the kernel of the no-cache path (xla, Pallas splash on
  TPU, cuDNN on GPU; "auto" by platform at trace time). Splash and cuDNN mask by index, which equals the position
  mask for packed rows (positions consecutive within each document); decoding with a KV cache always runs xla.
* Families differ only by switches of ModelConfig: where the block's norms sit (`norm_position`: before the
  sub-blocks, or OLMo 2's after them, on their outputs), whether q and k are RMS-normed before RoPE (`qk_norm`: per
  head or over the whole projection), and how RoPE frequencies are scaled (`rope_scaling`: Llama 3's band-wise
  `llama3` or `linear`). `attend` and the masks are the same for all.
* Local and global attention (Mistral, Gemma 2/3). `sliding_window` W makes a position attend only to its W - 1
  previous keys; `layer_types` (one entry per depth position, Hugging Face's "sliding_attention" / "full_attention")
  says which positions are local; sliding positions of Gemma 3 also rotate with their own RoPE base
  (`rope_local_theta`). The kind belongs to the depth position, not to the shared layer: when the kinds differ
  between positions, `Decoder.weights()` adds the per-position flag `relax/local` [L] (a constant, not a
  parameter) that the scan hands to each position like its LoRA factors, so a shared layer used at a local and at
  a global position attends locally at the one and globally at the other, and a full-rank relaxed model still
  reproduces the original. When every position has the same kind the flag is static (no `relax/local`).
* Gemma 2/3 also soft-cap attention logits (`attn_soft_cap`) and the final logits (`final_soft_cap`): c tanh(x / c),
  scale queries by 1 / sqrt(query_pre_attn_scalar) (`query_scalar`), and norm both the input and the output of
  each sub-block (`norm_position="sandwich"`: x + post_norm(f(norm x)), norms `attn_norm`, `attn_post_norm`,
  `mlp_norm`, `mlp_post_norm`).
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrt import attention as attention_lib
from rrt import lora

STRATEGIES = ("cycle", "sequence")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
ATTN_PROJECTIONS = ("q", "k", "v", "o")
REMAT_POLICIES = ("none", "full", "dots")
QK_NORMS = ("none", "head", "proj")
ROPE_SCALINGS = ("none", "linear", "llama3")
NORM_POSITIONS = ("pre", "post", "sandwich")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Per-position constants that `Decoder.weights()` adds to the per-position arrays (not parameters).
POSITION_CONSTANTS = ("local",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus recursion. Every field has a meaning for every family."""

    vocab_size: int
    d_model: int
    n_layers: int  # L: depth positions (the original model's layer count)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    # llama | mistral | gemma | gemma2 | gemma3 | neox | qwen2 | qwen3 | olmo2 (names the HF format; behaviour: the
    # switches)
    family: str = "llama"
    norm: str = "rms"  # rms | layer (LayerNorm with bias)
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w): offset 1
    act: str = "silu"  # silu | gelu_tanh | gelu
    gated_mlp: bool = True  # SwiGLU/GeGLU: down(act(gate x) * up x); else down(act(up x))
    parallel_residual: bool = False  # NeoX: x + attn(ln1 x) + mlp(ln2 x)
    norm_position: str = "pre"  # pre: x + f(norm x); post (OLMo 2): x + norm(f(x)); sandwich (Gemma 2/3): both
    qk_norm: str = "none"  # RMSNorm of q and k before RoPE: none | head (Qwen3, over H) | proj (OLMo 2, over N*H)
    attn_bias: bool = False  # biases on q, k, v
    o_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0  # fraction of head_dim that is rotated (NeoX: 0.25)
    rope_scaling: str = "none"  # none | linear (frequencies / factor) | llama3 (Llama 3.x band-wise scaling)
    rope_factor: float = 1.0  # linear and llama3
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / low_freq_factor are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / high_freq_factor are kept
    rope_original_positions: int = 8192  # llama3: the pretraining context (original_max_position_embeddings)
    tie_embeddings: bool = True
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(D)
    # Local attention, soft caps, query scale (Mistral, Gemma 2/3; see the module notes).
    sliding_window: int = 0  # W > 0: local positions see themselves and the W - 1 keys before them
    layer_types: tuple[str, ...] = ()  # per depth position, of LAYER_TYPES; (): all local if sliding_window else global
    rope_local_theta: float = 0.0  # local positions' RoPE base (unscaled; Gemma 3); 0: the same RoPE as global ones
    attn_soft_cap: float = 0.0  # attention logits -> c tanh(logits / c) (Gemma 2); 0: none
    final_soft_cap: float = 0.0  # output logits -> c tanh(logits / c) (Gemma 2); 0: none
    query_scalar: float = 0.0  # attention scale 1 / sqrt(query_scalar) (Gemma's query_pre_attn_scalar); 0: head_dim
    # Recursion.
    n_loops: int = 1  # R; K = n_layers / n_loops shared layers
    strategy: str = "cycle"  # cycle: position l uses layer l mod K; sequence: layer floor(l / R)
    rank_attn: int = 0  # LoRA rank on q, k, v, o (0: strict sharing); capped per projection at min(d_in, d_out)
    rank_mlp: int = 0  # LoRA rank on gate, up, down
    lora_alpha: float = 0.0  # s = alpha / r; 0 means alpha = r (s = 1)
    per_position_norms: bool = False  # norm weights and projection biases (the vector parameters) per position
    # Compute.
    dtype: str = "float32"  # activation/matmul dtype; parameters keep their own dtype
    remat: str = "none"  # none | full | dots (save matmul outputs)
    # Attention kernel of the no-cache path (training, prefill): auto | xla | splash | cudnn; auto resolves at trace
    # time to splash on TPU, cudnn on GPU (where it supports the call), else xla (rrt/attention.py). Decoding with
    # a KV cache always runs xla.
    attention: str = "auto"

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"ModelConfig: {msg}")

        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # from_dict of JSON gives a list

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "n_loops"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_layers % self.n_loops:
            bad(f"n_layers={self.n_layers} is not divisible by n_loops={self.n_loops}")
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.strategy not in STRATEGIES:
            bad(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if self.norm not in ("rms", "layer"):
            bad(f"unknown norm {self.norm!r}")
        if self.act not in ("silu", "gelu_tanh", "gelu"):
            bad(f"unknown act {self.act!r}")
        if self.remat not in REMAT_POLICIES:
            bad(f"unknown remat {self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention not in attention_lib.KINDS:
            bad(f"unknown attention {self.attention!r}; expected one of {attention_lib.KINDS}")
        for name, allowed in (
            ("qk_norm", QK_NORMS),
            ("rope_scaling", ROPE_SCALINGS),
            ("norm_position", NORM_POSITIONS),
        ):
            if getattr(self, name) not in allowed:
                bad(f"unknown {name} {getattr(self, name)!r}; expected one of {allowed}")
        if self.norm_position == "post" and self.parallel_residual:
            bad("norm_position='post' with parallel_residual is not a model anyone ships")
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            bad(f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed rope_low_freq_factor")
        if self.layer_types and len(self.layer_types) != self.n_layers:
            bad(f"layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
        if set(self.layer_types) - set(LAYER_TYPES):
            bad(f"unknown layer_types {sorted(set(self.layer_types) - set(LAYER_TYPES))}; expected of {LAYER_TYPES}")
        if self.sliding_window < 0 or ("sliding_attention" in self.layer_types and not self.sliding_window):
            bad(f"sliding_window={self.sliding_window}: sliding_attention positions need a positive window")
        if self.norm_position == "sandwich" and (self.norm != "rms" or self.parallel_residual):
            bad("norm_position='sandwich' is Gemma 2/3's: RMSNorm, sequential residual")
        for name in ("rope_local_theta", "attn_soft_cap", "final_soft_cap", "query_scalar"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.rotary_pct <= 1:
            bad(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        for name, rank, dims in (
            ("rank_attn", self.rank_attn, self.attn_dims()),
            ("rank_mlp", self.rank_mlp, self.mlp_dims()),
        ):
            limit = max(min(d) for d in dims)
            if rank < 0 or rank > limit:
                bad(f"{name}={rank} must be in [0, {limit}] (the largest min(d_in, d_out) of its projections)")
        jnp.dtype(self.dtype)

    @property
    def n_shared(self) -> int:
        """K: unique layers."""
        return self.n_layers // self.n_loops

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def relaxed(self) -> bool:
        return self.rank_attn > 0 or self.rank_mlp > 0

    def local_positions(self) -> np.ndarray:
        """[L] bool: whether depth position l attends locally (within `sliding_window`)."""
        if not self.layer_types:
            return np.full(self.n_layers, self.sliding_window > 0)
        return np.array([t == "sliding_attention" for t in self.layer_types])

    @property
    def mixed_attention(self) -> bool:
        """Whether local and global positions alternate (then the kind is a per-position array `relax/local`)."""
        return len(set(self.local_positions().tolist())) > 1

    @property
    def attn_scale(self) -> float | None:
        """The attention logit scale; None: 1 / sqrt(head_dim)."""
        return self.query_scalar**-0.5 if self.query_scalar else None

    def attn_dims(self) -> list[tuple[int, int]]:
        d, nh, gh = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return [(d, nh), (d, gh), (d, gh), (nh, d)]

    def mlp_dims(self) -> list[tuple[int, int]]:
        d, f = self.d_model, self.d_ff
        return ([(d, f)] if self.gated_mlp else []) + [(d, f), (f, d)]

    def projections(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every projection in a block."""
        names = ATTN_PROJECTIONS + (("gate",) if self.gated_mlp else ()) + ("up", "down")
        return dict(zip(names, self.attn_dims() + self.mlp_dims()))

    def group_rank(self, proj: str) -> int:
        """The configured rank of the projection's group (attention or MLP)."""
        return self.rank_attn if proj in ATTN_PROJECTIONS else self.rank_mlp

    def rank(self, proj: str) -> int:
        """The rank actually used: the group's rank capped at min(d_in, d_out) (beyond it a factor adds nothing)."""
        return min(self.group_rank(proj), min(self.projections()[proj]))

    def lora_scale(self, proj: str) -> float:
        """s = alpha / r with r the group's configured rank."""
        r = self.group_rank(proj)
        return (self.lora_alpha or r) / r if r else 0.0

    def bias_names(self) -> list[str]:
        names = [p + "_bias" for p in ("q", "k", "v") if self.attn_bias] + (["o_bias"] if self.o_bias else [])
        return names + [p + "_bias" for p in ("gate", "up", "down") if self.mlp_bias and p in self.projections()]

    def layer_ids(self) -> np.ndarray:
        """[R, K] int32: the shared layer used by depth position l = r * K + k."""
        pos = np.arange(self.n_layers)
        ids = pos % self.n_shared if self.strategy == "cycle" else pos // self.n_loops
        return ids.reshape(self.n_loops, self.n_shared).astype(np.int32)

    def norm_names(self) -> list[str]:
        names = ["attn_norm", "mlp_norm"]
        if self.norm_position == "sandwich":
            names = ["attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm"]
        names = names + [n + "_bias" for n in names] if self.norm == "layer" else names
        return names + (["q_norm", "k_norm"] if self.qk_norm != "none" else [])

    def norm_dim(self, name: str) -> int:
        """The length of norm weight `name` (a name of `norm_names`)."""
        if name in ("q_norm", "k_norm") and self.qk_norm == "proj":
            return (self.n_heads if name == "q_norm" else self.n_kv_heads) * self.head_dim
        return self.head_dim if name in ("q_norm", "k_norm") else self.d_model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


NORMS = ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm", "q_norm", "k_norm")


# Logical axes of every parameter (leading stack axis included); sharding.py maps them onto the mesh.
def param_axes(name: str) -> tuple[str | None, ...]:
    """Logical axis names of a flat parameter name (see the module docstring)."""
    top, _, leaf = name.partition("/")
    if top == "embed":
        return ("vocab", "embed")
    if top == "head":
        return ("embed", "vocab")
    if top.startswith("final_norm"):
        return ("norm",)
    stack = "layers" if top == "layers" else "positions"
    base = leaf.removesuffix("_a").removesuffix("_b").removesuffix("_bias")
    out_axis = {"q": "heads", "k": "kv", "v": "kv", "o": "embed", "gate": "mlp", "up": "mlp", "down": "embed"}
    in_axis = {"o": "heads", "down": "mlp"}
    if base in NORMS:
        return (stack, "norm")
    if leaf.endswith("_bias"):
        return (stack, out_axis[base])
    if leaf.endswith("_a"):
        return (stack, in_axis.get(base, "embed"), "rank")
    if leaf.endswith("_b"):
        return (stack, "rank", out_axis[base])
    return (stack, in_axis.get(base, "embed"), out_axis[base])


def _normal(rngs: nnx.Rngs, shape, std=0.02) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Decoder(nnx.Module):
    """Token ids -> logits. See the module docstring for the parameter layout."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, v, k, l = cfg.d_model, cfg.vocab_size, cfg.n_shared, cfg.n_layers
        self.embed = nnx.Param(_normal(rngs, (v, d)))
        self.layers = nnx.Dict()
        self.relax = nnx.Dict()
        vectors, n_vec = (self.relax, l) if cfg.per_position_norms else (self.layers, k)
        bias_names = cfg.bias_names()
        for name, (din, dout) in cfg.projections().items():
            self.layers[name] = nnx.Param(_normal(rngs, (k, din, dout)))
            if name + "_bias" in bias_names:
                vectors[name + "_bias"] = nnx.Param(jnp.zeros((n_vec, dout)))
            if r := cfg.rank(name):
                self.relax[name + "_a"] = nnx.Param(_normal(rngs, (l, din, r)))
                self.relax[name + "_b"] = nnx.Param(jnp.zeros((l, r, dout)))
        for name in cfg.norm_names():
            init = 0.0 if name.endswith("_bias") or cfg.norm_offset else 1.0
            vectors[name] = nnx.Param(jnp.full((n_vec, cfg.norm_dim(name)), init))
        self.final_norm = nnx.Param(jnp.full((d,), 0.0 if cfg.norm_offset else 1.0))
        if cfg.norm == "layer":
            self.final_norm_bias = nnx.Param(jnp.zeros((d,)))
        if not cfg.tie_embeddings:
            self.head = nnx.Param(_normal(rngs, (d, v)))

    def __call__(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array | None = None,
        segment_ids_BxT: jax.Array | None = None,
        *,
        cache: dict | None = None,
        return_loop_hiddens: bool = False,
        constrain_shared=None,
    ):
        """Logits [B, T, V]; with `cache`, also the updated cache; with `return_loop_hiddens`, the hidden state
        after each loop [R, B, T, D] (before the final norm; `self.logits` turns one into logits).
        `constrain_shared` (dict -> dict) is applied to the shared block before the loops (sharding.py)."""
        x_BxTxD = self.embed_tokens(tokens_BxT)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        weights = self.weights()
        if constrain_shared is not None:
            weights["layers"] = constrain_shared(weights["layers"])
        x_BxTxD, hiddens_RxBxTxD, cache = stack(self.cfg, weights, x_BxTxD, positions_BxT, segment_ids_BxT, cache)
        out = (self.logits(x_BxTxD),)
        if cache is not None:
            out += (cache,)
        if return_loop_hiddens:
            out += (hiddens_RxBxTxD,)
        return out[0] if len(out) == 1 else out

    def weights(self) -> dict[str, dict[str, jax.Array]]:
        """The shared (`layers`) and per-position (`relax`) arrays as plain dicts; `relax` also holds the
        per-position constants (`position_constants`), which are not parameters."""
        return {
            "layers": {k: v[...] for k, v in self.layers.items()},
            "relax": {**{k: v[...] for k, v in self.relax.items()}, **position_constants(self.cfg)},
        }

    @jax.named_scope("embed")  # the profile's part names (rrt/benchmarks/profile.py): embed, norm, qkv, ...
    def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.cfg.dtype)
        x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dtype)
        if self.cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(self.cfg.d_model), dtype)
        return x

    def final_norm_of(self, x: jax.Array) -> jax.Array:
        bias = self.final_norm_bias[...] if self.cfg.norm == "layer" else None
        return norm(self.cfg, x, self.final_norm[...], bias)

    def logits(self, x_BxTxD: jax.Array) -> jax.Array:
        """Final norm and head; float32 logits."""
        h = self.final_norm_of(x_BxTxD)
        tied = self.cfg.tie_embeddings
        head = self.embed[...] if tied else self.head[...]  # tied: the table [V, D], contracted untransposed
        y_BxTxV = lora.matmul_rows(h, head, out_dtype=jnp.float32, w_transposed=tied)
        return soft_cap(y_BxTxV, self.cfg.final_soft_cap)

    def logits_rows(self, x_NxD: jax.Array) -> jax.Array:
        """`logits` of a few rows [N, D] (decoding), computed as [V, N] and transposed after a barrier. Same values;
        on XLA:CPU the [N, D] x [D, V] dot with few rows gets a slow kernel (measured on 2 cores, SmolLM2's head:
        16-18 ms for 2-8 rows, against 10-13 ms this way); elsewhere the barrier only costs an [N, V] transpose."""
        h_NxD = self.final_norm_of(x_NxD)
        if self.cfg.tie_embeddings:
            w, spec = self.embed[...], "vd,nd->vn"
        else:
            w, spec = self.head[...], "dv,nd->vn"
        y_VxN = jnp.einsum(spec, w.astype(h_NxD.dtype), h_NxD, preferred_element_type=jnp.float32)
        return jax.lax.optimization_barrier(soft_cap(y_VxN, self.cfg.final_soft_cap)).T


# ---------------------------------------------------------------------------------------------------------------
# Pure functions on arrays: the block, and the looped stack.


def position_constants(cfg: ModelConfig) -> dict[str, jax.Array]:
    """The per-position constants [L] that travel with the per-position weights: `local` when local and global
    positions alternate (else the kind is static: `block` reads `cfg`)."""
    return {"local": jnp.asarray(cfg.local_positions())} if cfg.mixed_attention else {}


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """c tanh(x / c) (Gemma 2's soft capping); x itself when cap is 0."""
    return cap * jnp.tanh(x / cap) if cap else x


def is_local(cfg: ModelConfig, w: dict):
    """Whether the position of weights `w` attends locally: a Python bool when every position has the same kind,
    else the traced per-position flag `w["local"]` (a scalar, or [B] per example in depth-wise batching)."""
    return w["local"] if "local" in w else bool(cfg.local_positions()[0])


def _per_row(flag, ndim: int):
    """A scalar or [B] flag, shaped to broadcast against a [B, ...] array of `ndim` axes."""
    flag = jnp.asarray(flag)
    return flag.reshape(flag.shape + (1,) * (ndim - flag.ndim))


@jax.named_scope("norm")
def norm(cfg: ModelConfig, x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """RMSNorm (optionally Gemma's 1 + w) or LayerNorm over the last axis, computed in float32. w may be [D] or per
    example [B, D] (x [B, ..., D])."""
    if w.ndim == 2:  # per-example weights (depth-wise batching): broadcast over time (and heads)
        expand = (w.shape[0],) + (1,) * (x.ndim - 2) + (w.shape[1],)
        w, b = w.reshape(expand), (b.reshape(expand) if b is not None else None)
    x32 = x.astype(jnp.float32)
    if cfg.norm == "rms":
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
        y = y * (cfg.norm_offset + w.astype(jnp.float32))
    else:
        mu = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
        y = (x32 - mu) * jax.lax.rsqrt(var + cfg.norm_eps) * w.astype(jnp.float32) + b.astype(jnp.float32)
    return y.astype(x.dtype)


def _act(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    if cfg.act == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=cfg.act == "gelu_tanh")


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """[rotary_dim / 2] float32 inverse frequencies, scaled as `rope_scaling` says (local positions with their own
    base `rope_local_theta`: unscaled). Computed in float32 with transformers' expressions (modeling_rope_utils), so
    both sides round alike."""
    rd = cfg.rotary_dim
    exponent = np.arange(0, rd, 2).astype(np.float32) / np.float32(rd)
    if local and cfg.rope_local_theta:
        return (1.0 / np.float32(cfg.rope_local_theta) ** exponent).astype(np.float32)
    inv_freq = (1.0 / np.float32(cfg.rope_theta) ** exponent).astype(np.float32)
    if cfg.rope_scaling == "linear":
        return (inv_freq / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_scaling == "llama3":  # long wavelengths / factor, short kept, a smooth blend between
        factor, low, high = (
            np.float32(v) for v in (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor)
        )
        old = np.float32(cfg.rope_original_positions)
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope(cfg: ModelConfig, x_BxTxNxH: jax.Array, positions_BxT: jax.Array, local=False) -> jax.Array:
    """Rotary embedding in the Hugging Face (rotate-half) layout on the first `rotary_dim` dims of each head.
    `local` (see `is_local`) picks the local positions' base where it has its own (`rope_local_theta`)."""
    rd = cfg.rotary_dim
    pos_BxTx1 = positions_BxT.astype(jnp.float32)[..., None]
    freqs = pos_BxTx1 * jnp.asarray(rope_inv_freq(cfg))  # [B, T, rd/2]
    if cfg.rope_local_theta and local is not False:
        local_freqs = pos_BxTx1 * jnp.asarray(rope_inv_freq(cfg, local=True))
        freqs = local_freqs if local is True else jnp.where(_per_row(local, 3), local_freqs, freqs)
    cos, sin = jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]
    x_rot, x_pass = x_BxTxNxH[..., :rd].astype(jnp.float32), x_BxTxNxH[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2 :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxNxH.dtype)
    return jnp.concatenate([rotated, x_pass], axis=-1) if rd < cfg.head_dim else rotated


def _write_cache(cache_BxSxGxH: jax.Array, new_BxTxGxH: jax.Array, start_B: jax.Array) -> jax.Array:
    """Writes each row's new entries at its own start position."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), s, axis=0))(
        cache_BxSxGxH, new_BxTxGxH, start_B
    )


# The inputs the projections see, by the group of projections that share them (what `block` records in `taps`).
TAPS = {"attn_in": ("q", "k", "v"), "o_in": ("o",), "mlp_in": ("gate", "up"), "down_in": ("down",)}


def tap_of(proj: str) -> str:
    """The name of the input that projection `proj` sees (a key of TAPS)."""
    return next(t for t, projs in TAPS.items() if proj in projs)


def projection(cfg: ModelConfig, w: dict, name: str):
    """x -> x W (+ bias) (+ s x a b): projection `name` of the block weights `w` (see `block`)."""
    factors = (w[name + "_a"], w[name + "_b"], w.get("lora_group")) if name + "_a" in w else None
    return lambda x: lora.project(x, w[name], w.get(name + "_bias"), factors, cfg.lora_scale(name))


def attn_input(cfg: ModelConfig, w: dict, x_BxTxD: jax.Array) -> jax.Array:
    """What q, k and v project: the normed residual (pre-norm), or the residual itself (post-norm, OLMo 2)."""
    if cfg.norm_position == "post":
        return x_BxTxD
    return norm(cfg, x_BxTxD, w["attn_norm"], w.get("attn_norm_bias"))


@jax.named_scope("qkv")
def heads(cfg: ModelConfig, w: dict, name: str, h_BxTxD: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    """q, k or v [B, T, N or G, H] of the attention input h: projected, qk-normed (q, k; OLMo 2 over the whole
    projection, Qwen3 and Gemma 3 per head), split into heads, rotated (q, k; with the local base at local
    positions)."""
    b, t, _ = h_BxTxD.shape
    y_BxTxF = projection(cfg, w, name)(h_BxTxD)
    rotated = name in ("q", "k")
    if rotated and cfg.qk_norm == "proj":
        y_BxTxF = norm(cfg, y_BxTxF, w[name + "_norm"])
    y = y_BxTxF.reshape(b, t, -1, cfg.head_dim)
    if rotated and cfg.qk_norm == "head":
        y = norm(cfg, y, w[name + "_norm"])
    return rope(cfg, y, positions_BxT, is_local(cfg, w)) if rotated else y


def block(
    cfg: ModelConfig,
    w: dict,
    x_BxTxD,
    positions_BxT,
    segment_ids_BxT=None,
    cache: dict | None = None,
    taps: dict | None = None,
):
    """One transformer block. `w` holds this position's weights: the shared layer's, its norms, its LoRA factors
    (`<proj>_a`, `<proj>_b`, optionally with a leading per-example axis, or stacked [G, ...] and selected per
    example by a one-hot `lora_group` [B, G]: see `lora.delta`). Returns (x, updated cache entry).
    `taps` (a dict, filled in place within the caller's trace) receives the input of every projection group (see
    TAPS): the attention input (`attn_input`), the attention output before `o`, the MLP input (normed unless
    post-norm), `down`'s input."""
    taps = {} if taps is None else taps
    b, t, _ = x_BxTxD.shape
    dtype = x_BxTxD.dtype

    def proj(name):
        return projection(cfg, w, name)

    local = is_local(cfg, w)
    window = cfg.sliding_window if cfg.sliding_window and local is not False else None
    attn_kw = dict(scale=cfg.attn_scale, soft_cap=cfg.attn_soft_cap or None)

    def attention(h):
        taps["attn_in"] = h
        q, k, v = (heads(cfg, w, name, h, positions_BxT) for name in "qkv")
        if cache is None:  # cfg.attention's kernel; splash/cudnn mask by index (rrt/attention.py, "Masks")
            out = jax.named_scope("attention")(attention_lib.self_attention)(
                q,
                k,
                v,
                positions_BxT,
                segment_ids_BxT,
                kind=cfg.attention,
                sliding_window=window,
                local=None if local is True else local,
                **attn_kw,
            )
            new_cache = None
        else:  # key slot s holds absolute position s; rows may be at different positions
            start = positions_BxT[:, 0]
            new_cache = {"k": _write_cache(cache["k"], k, start), "v": _write_cache(cache["v"], v, start)}
            k, v = new_cache["k"].astype(dtype), new_cache["v"].astype(dtype)
            slot_1x1xS, pos_BxTx1 = jnp.arange(k.shape[1])[None, None, :], positions_BxT[:, :, None]
            mask = slot_1x1xS <= pos_BxTx1
            if window is not None:  # local positions: only the window's keys (per row in depth-wise batching)
                near = pos_BxTx1 - slot_1x1xS < window
                mask &= near if local is True else near | ~_per_row(local, 3)
            out = jax.named_scope("attention")(attention_lib.attend)(q, k, v, mask, **attn_kw)
        out = out.reshape(b, t, cfg.n_heads * cfg.head_dim)
        taps["o_in"] = out
        with jax.named_scope("out_proj"):
            return proj("o")(out), new_cache

    @jax.named_scope("mlp")
    def mlp(h):
        taps["mlp_in"] = h
        up = proj("up")(h)
        hidden = _act(cfg, proj("gate")(h)) * up if cfg.gated_mlp else _act(cfg, up)
        taps["down_in"] = hidden
        return proj("down")(hidden)

    attn_out, new_cache = attention(attn_input(cfg, w, x_BxTxD))
    if cfg.norm_position == "sandwich":  # Gemma 2/3: normed input and normed output
        x_BxTxD = x_BxTxD + norm(cfg, attn_out, w["attn_post_norm"])
        x_BxTxD = x_BxTxD + norm(cfg, mlp(norm(cfg, x_BxTxD, w["mlp_norm"])), w["mlp_post_norm"])
    elif cfg.norm_position == "post":  # OLMo 2: each sub-block's output is normed before the residual add
        x_BxTxD = x_BxTxD + norm(cfg, attn_out, w["attn_norm"], w.get("attn_norm_bias"))
        x_BxTxD = x_BxTxD + norm(cfg, mlp(x_BxTxD), w["mlp_norm"], w.get("mlp_norm_bias"))
    elif cfg.parallel_residual:
        x_BxTxD = x_BxTxD + attn_out + mlp(norm(cfg, x_BxTxD, w["mlp_norm"], w.get("mlp_norm_bias")))
    else:
        x_BxTxD = x_BxTxD + attn_out
        x_BxTxD = x_BxTxD + mlp(norm(cfg, x_BxTxD, w["mlp_norm"], w.get("mlp_norm_bias")))
    return x_BxTxD, new_cache


def _remat(cfg: ModelConfig, fn):
    if cfg.remat == "none":
        return fn
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots" else None
    return jax.checkpoint(fn, policy=policy)


def shared_layer(shared: dict, layer_id) -> dict:
    """The weights of shared layer `layer_id` (a traced index) from the [K, ...] stack."""
    return {k: jax.lax.dynamic_index_in_dim(v, layer_id, keepdims=False) for k, v in shared.items()}


def stack(cfg: ModelConfig, weights: dict, x_BxTxD, positions_BxT, segment_ids_BxT=None, cache=None):
    """The looped stack: one scan over the L = R * K depth positions. Returns (x, hiddens [R,B,T,D], cache).

    Position l runs shared layer `layer_ids[l]` (closed over, picked by a dynamic index) with its own per-position
    weights (scanned). The hidden state after every loop is kept in a small [R, B, T, D] carry: position l writes
    slot l // K, so the last write of each loop (position r K + K - 1) stays. One flat scan rather than a scan over
    loops of a scan over positions: nested, the outer scan restacks the inner scans' residuals into [R, K, ...]
    buffers for the backward pass, and a step without remat then needs more memory than the vanilla model."""
    r, k = cfg.n_loops, cfg.n_shared
    if lora.mixed_on_cpu(x_BxTxD):  # each position casts its own slice; the shared gradient adds up in float32
        shared = weights["layers"]  # (cast before the loop, XLA:CPU rewrote the whole [K, ...] bf16 stack per position)
    else:
        shared = {name: v.astype(x_BxTxD.dtype) for name, v in weights["layers"].items()}
    hiddens_RxBxTxD = jnp.zeros((r,) + x_BxTxD.shape, x_BxTxD.dtype)

    def position(x, xs):
        relax_l, layer_id, cache_l = xs
        x, cache_l = block(
            cfg, {**shared_layer(shared, layer_id), **relax_l}, x, positions_BxT, segment_ids_BxT, cache_l
        )
        return x, cache_l

    position = _remat(cfg, position)

    def step(carry, xs):
        x, hiddens = carry
        x, cache_l = position(x, xs[1:])
        hiddens = jax.lax.dynamic_update_index_in_dim(hiddens, x, xs[0] // k, 0)
        return (x, hiddens), cache_l

    xs = (jnp.arange(r * k), weights["relax"], jnp.asarray(cfg.layer_ids().reshape(-1)), cache)
    (x_BxTxD, hiddens_RxBxTxD), cache = jax.lax.scan(step, (x_BxTxD, hiddens_RxBxTxD), xs)
    return x_BxTxD, hiddens_RxBxTxD, cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty KV cache, one entry per depth position: {k, v}: [L, B, S, G, H]."""
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


# ---------------------------------------------------------------------------------------------------------------
# Flat name <-> array views of a model, used by loaders, conversion and checkpoints.


def flat_params(model: Decoder) -> dict[str, Any]:
    """{flat name: array} for every parameter (see the module docstring for names)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out["/".join(str(p) for p in path)] = var.get_value()
    return out


def abstract(cfg: ModelConfig) -> Decoder:
    """The model with ShapeDtypeStruct leaves: real sizes cost no memory."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat "a/b/c" names -> nested dicts (the tree Orbax stores)."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> flat "a/b/c" names (the inverse of `nest`)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flat_params(abstract(cfg)).items()}


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts: embedding (embed + head), shared (layers + final norm), LoRA, per-position vectors."""
    counts = {"embedding": 0, "shared": 0, "lora": 0, "position_vectors": 0}
    for name, shape in param_shapes(cfg).items():
        n = int(np.prod(shape))
        if name in ("embed", "head"):
            counts["embedding"] += n
        elif name.startswith("relax/"):
            counts["lora" if name.endswith(("_a", "_b")) else "position_vectors"] += n
        else:
            counts["shared"] += n
    counts["total"] = sum(counts.values())
    return counts


def from_params(cfg: ModelConfig, params: dict[str, Any], dtype=None) -> Decoder:
    """Builds a Decoder holding exactly `params` (flat names). Missing, extra or misshapen tensors are errors."""
    model = abstract(cfg)
    expected = flat_params(model)
    missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"parameters do not match the model config: missing {missing}, unexpected {extra}")
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        name = "/".join(str(p) for p in path)
        value = params[name]
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"parameter {name!r}: shape {tuple(value.shape)}, model expects {tuple(expected[name].shape)}"
            )
        var.set_value(jnp.asarray(value, dtype=dtype))
    nnx.update(model, state)
    return model
