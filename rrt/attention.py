"""Causal self-attention over packed rows, three ways: plain XLA, Pallas splash (TPU) and cuDNN (GPU).

Shapes follow rrt/model.py's legend: q [B, T, N, H], k and v [B, S, G, H] with N a multiple of G (G = N: multi-head,
1 < G < N: grouped-query, G = 1: multi-query); the output is [B, T, N, H] in v's dtype.

Design notes.
* `self_attention` is the training/prefill entry: it takes the row's positions and segment ids and dispatches on
  `kind` (ModelConfig.attention). `attend` is the XLA core with an explicit [B, T, S] mask; the decoding path (a KV
  cache, whose key slots are absolute positions) calls it directly, so decoding always runs on XLA.
* Masks. The XLA path (`blockwise`) builds its mask from positions (key position <= query position) and segment
  equality, inside query blocks that skip the keys above the diagonal (and, under a window on every query, those
  before it). Splash and cuDNN mask by *index* (key index <= query index) plus segment equality. All three agree
  whenever the positions inside each segment are consecutive (each token's position is the previous token's plus 1):
  then pos_q - pos_k = q - k for every pair in a segment, and no key after a query's block is visible to it. Packed
  training rows are built that way (rrt/data/packing.py: positions restart at 0 at every document and count up;
  padding is segment 0 at position 0, attends only to padding and carries no loss), and a call without positions
  uses arange. Callers that pass other positions (left padding, a KV cache) must call `attend` with their own
  mask, as decoding does; `positions_consecutive` checks the property on host arrays.
* The XLA path's blocks (XLA_BLOCK = 128 query rows) are about the causal half and the layout, not a fused
  kernel: each block's float32 scores [B, G, 128 * N/G, S_block] are materialised and softmaxed by XLA, and
  autodiff keeps its probabilities. Against the one [B, G, N/G, T, T] einsum it replaced this is 3-4x faster at
  1,024 tokens on a CPU (docs/TRAINING.md, "Where the time goes") and holds about half the scores.
* `sliding_window` W (int | None): a query sees itself and the W - 1 keys before it (q - k < W, Hugging Face's
  Mistral/Gemma convention). `soft_cap` c (float | None): logits -> c * tanh(logits / c), after the scale
  (Gemma 2). `scale` defaults to 1 / sqrt(H) (Gemma: 1 / sqrt(query_pre_attn_scalar)). ModelConfig's
  `sliding_window`, `attn_soft_cap` and `query_scalar` set them. `local` (a traced boolean scalar, None: True) says
  whether the window applies: in models whose local and global layers alternate the kind is a per-position value
  of the scan (rrt/model.py), so one traced block serves both. XLA masks with it; splash and cuDNN, whose masks are
  static, pick one of two kernels (with and without the window) with `lax.cond`.
* "auto" resolves at trace time (`resolve`): on the platform of the abstract mesh in context (rrt.train.build_step
  traces the step under `jax.sharding.use_abstract_mesh`, so a TPU program compiled ahead of time on a CPU host
  resolves to splash), else `jax.default_backend()`. TPU: splash when the row length suits its blocks and there is
  a mesh in context to shard_map over (or a single device: evaluation and decoding jit outside the train step's
  mesh, and XLA cannot partition a Mosaic kernel itself), GPU: cuDNN when its kernel supports the call (16-bit
  dtype, no soft cap, head dim a multiple of 8 up to 128), else XLA. (Gemma 2/3's head dim 256 and Gemma 2's soft
  cap therefore run XLA on GPU under "auto".)
* Splash is a Mosaic kernel, which XLA does not partition: it runs inside `jax.shard_map` over the mesh in context,
  rows over the table's `batch` axes and heads over `heads` (rrt/sharding.py RULES; an axis that does not divide
  the dimension is replicated, as for parameters), one kernel per local row (vmap). Off TPU it runs in Pallas
  interpret mode (tests on CPU). Block sizes are the largest of 512, 256, 128 dividing T (the kernel needs
  multiples of 128): rows of other lengths (evaluation windows of seq_len - 1 tokens, prefill) run xla, also under
  an explicit "splash"; rrt.train refuses a training seq_len that splash cannot take.
* cuDNN: `jax.nn.dot_product_attention(implementation="cudnn")` has no segment ids; `cudnn_arguments` passes
  them as a dense [B, 1, T, S] boolean mask (turned into an additive bias by JAX, B * T * S elements: 128 MiB per
  8k-token row in bfloat16) beside `is_causal` and the window. MaxText's cuDNN path once dropped the segment ids
  (maxtext#4476); tests/attention_test.py runs the XLA implementation with exactly these arguments on packed rows.
  cuDNN cannot soft-cap: an explicit "cudnn" with `soft_cap` raises.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from rrt import platform as platform_lib
from rrt import sharding as sharding_lib

KINDS = ("auto", "xla", "splash", "cudnn")
_SPLASH_BLOCKS = (512, 256, 128)
XLA_BLOCK = 128  # query rows per block of the XLA path (`blockwise`); measured in docs/TRAINING.md


def causal_mask(positions_BxT, segment_ids_BxT=None, sliding_window: int | None = None, local=None) -> jax.Array:
    """[B, T, T] bool: key position <= query position (and within the window where `local`), same segment."""
    return block_mask(positions_BxT, positions_BxT, segment_ids_BxT, segment_ids_BxT, sliding_window, local)


def block_mask(pos_q_BxT, pos_k_BxS, seg_q_BxT=None, seg_k_BxS=None, sliding_window=None, local=None) -> jax.Array:
    """[B, T, S] bool for queries at `pos_q` against keys at `pos_k`: key position <= query position, within the
    window where `local` (None: always), same segment (where segment ids are given)."""
    q, k = pos_q_BxT[:, :, None], pos_k_BxS[:, None, :]
    mask = k <= q
    if sliding_window is not None:
        near = q - k < sliding_window
        mask &= near if local is None else near | ~jnp.asarray(local)
    if seg_q_BxT is not None:
        mask &= seg_k_BxS[:, None, :] == seg_q_BxT[:, :, None]
    return mask


def attend(
    q_BxTxNxH, k_BxSxGxH, v_BxSxGxH, mask_BxTxS, *, scale: float | None = None, soft_cap: float | None = None
) -> jax.Array:
    """Grouped-query softmax attention in float32 (the XLA path); returns [B, T, N, H]."""
    b, t, n, h = q_BxTxNxH.shape
    g = k_BxSxGxH.shape[2]
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    q = q_BxTxNxH.reshape(b, t, g, n // g, h)
    logits = jnp.einsum("btgnh,bsgh->bgnts", q, k_BxSxGxH, preferred_element_type=jnp.float32) * scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(mask_BxTxS[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxGxH.dtype)
    out = jnp.einsum("bgnts,bsgh->btgnh", probs, v_BxSxGxH)
    return out.reshape(b, t, n, h)


def key_range(lo: int, hi: int, sliding_window: int | None, local) -> int:
    """The first key index a query block [lo, hi) can see (keys end at hi): 0, or lo - W + 1 under a window that
    applies to every query (`local` None). A traced `local` keeps every key: the block must serve both kinds."""
    if sliding_window is None or local is not None:
        return 0
    return max(0, lo - sliding_window + 1)


def blockwise(
    q_BxTxNxH,
    k_BxTxGxH,
    v_BxTxGxH,
    positions_BxT,
    segment_ids_BxT=None,
    *,
    block: int = XLA_BLOCK,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    scale: float | None = None,
    local=None,
) -> jax.Array:
    """Causal self-attention (the XLA path of `self_attention`) in query blocks of `block` rows: block i's queries
    meet only keys [first, end of block i) (`key_range`), so the keys above the diagonal, and those outside a
    window, are never computed. Within a block the mask is the exact position mask (`block_mask`); the skipped
    keys are the index assumption of splash and cuDNN (module notes, "Masks"). Heads are laid out batch-leading,
    q as [B, G, T * N/G, H] and k, v as [B, G, S, H], so every dot is a plain batched matmul over (B, G) with no
    transposes inside. Autodiff saves each block's probabilities: the lower triangle, not the [T, T] square."""
    b, t, n, h = q_BxTxNxH.shape
    g = k_BxTxGxH.shape[2]
    r = n // g
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    q_BxGxMxH = jnp.transpose((q_BxTxNxH * jnp.asarray(scale, q_BxTxNxH.dtype)).reshape(b, t, g, r, h), (0, 2, 1, 3, 4))
    q_BxGxMxH = q_BxGxMxH.reshape(b, g, t * r, h)  # row m = query t * r + its head within the group
    k_BxGxSxH, v_BxGxSxH = jnp.swapaxes(k_BxTxGxH, 1, 2), jnp.swapaxes(v_BxTxGxH, 1, 2)
    seg = segment_ids_BxT
    outs = []
    for lo in range(0, t, block):
        hi = min(t, lo + block)
        first = key_range(lo, hi, sliding_window, local)
        logits = jnp.einsum(
            "bgmh,bgsh->bgms",
            q_BxGxMxH[:, :, lo * r : hi * r],
            k_BxGxSxH[:, :, first:hi],
            preferred_element_type=jnp.float32,
        ).reshape(b, g, hi - lo, r, hi - first)
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        mask = block_mask(
            positions_BxT[:, lo:hi],
            positions_BxT[:, first:hi],
            None if seg is None else seg[:, lo:hi],
            None if seg is None else seg[:, first:hi],
            sliding_window,
            local,
        )
        logits = jnp.where(mask[:, None, :, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v_BxTxGxH.dtype).reshape(b, g, (hi - lo) * r, hi - first)
        outs.append(jnp.einsum("bgms,bgsh->bgmh", probs, v_BxGxSxH[:, :, first:hi]))
    out = jnp.concatenate(outs, axis=2).reshape(b, g, t, r, h)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(b, t, n, h)


def positions_consecutive(positions_BxT: np.ndarray, segment_ids_BxT: np.ndarray | None = None) -> bool:
    """Whether index masks (splash, cuDNN) equal position masks on these rows: inside every segment (a run of equal
    ids), each position is the previous one's plus 1. Host-side (numpy), for tests and data checks."""
    pos = np.asarray(positions_BxT)
    seg = np.zeros_like(pos) if segment_ids_BxT is None else np.asarray(segment_ids_BxT)
    same = seg[:, 1:] == seg[:, :-1]
    return bool(np.all(np.where(same, pos[:, 1:] - pos[:, :-1] == 1, True)))


# ---------------------------------------------------------------------------------------------------------------
# Choosing the kernel.


def splash_block(t: int) -> int | None:
    """The splash block size for rows of length t: the largest of 512, 256, 128 dividing t (the kernel needs
    multiples of 128, the TPU's lane count, even in interpret mode); None when there is none."""
    return next((b for b in _SPLASH_BLOCKS if t % b == 0), None)


def cudnn_supported(dtype, head_dim: int, soft_cap: float | None) -> bool:
    """Whether cuDNN's flash attention takes this call (jax.nn.dot_product_attention raises otherwise)."""
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128 and not soft_cap


def resolve(kind: str, *, seq_len: int, head_dim: int, dtype, soft_cap: float | None = None, platform=None) -> str:
    """The concrete kernel ("xla" | "splash" | "cudnn") for `kind`; "auto" picks by platform (see module notes)."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention {kind!r}; expected one of {KINDS}")
    if kind != "auto":
        return kind
    partitionable = True
    if platform is None:
        platform, partitionable = platform_lib.context()
    if platform == "tpu" and partitionable and splash_block(seq_len) is not None:
        return "splash"
    if platform in ("gpu", "cuda") and cudnn_supported(dtype, head_dim, soft_cap):
        return "cudnn"
    return "xla"


def self_attention(
    q_BxTxNxH,
    k_BxTxGxH,
    v_BxTxGxH,
    positions_BxT,
    segment_ids_BxT=None,
    *,
    kind: str = "xla",
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    scale: float | None = None,
    local=None,
) -> jax.Array:
    """Causal self-attention over (packed) rows with the kernel `kind` (see the module notes on masks). With a
    traced `local` flag, the window applies where it is true."""
    b, t, n, h = q_BxTxNxH.shape
    kind = resolve(kind, seq_len=t, head_dim=h, dtype=q_BxTxNxH.dtype, soft_cap=soft_cap)
    if kind == "splash" and splash_block(t) is None:  # e.g. evaluation windows of seq_len - 1 tokens
        kind = "xla"
    if kind != "xla" and sliding_window is not None and local is not None:  # static masks: one kernel per kind

        def run(window):
            return lambda: self_attention(
                q_BxTxNxH,
                k_BxTxGxH,
                v_BxTxGxH,
                positions_BxT,
                segment_ids_BxT,
                kind=kind,
                sliding_window=window,
                soft_cap=soft_cap,
                scale=scale,
            )

        return jax.lax.cond(jnp.asarray(local), run(sliding_window), run(None))
    if kind == "splash":
        return splash(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, segment_ids_BxT, sliding_window, soft_cap, scale)
    if kind == "cudnn":
        if soft_cap is not None:
            raise ValueError("attention='cudnn' cannot soft-cap logits (cuDNN has no such option): use 'xla'")
        args = cudnn_arguments(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, segment_ids_BxT, sliding_window, scale)
        return jax.nn.dot_product_attention(**args, implementation="cudnn")
    return blockwise(
        q_BxTxNxH,
        k_BxTxGxH,
        v_BxTxGxH,
        positions_BxT,
        segment_ids_BxT,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        scale=scale,
        local=local,
    )


# ---------------------------------------------------------------------------------------------------------------
# cuDNN.


def cudnn_arguments(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, segment_ids_BxT=None, sliding_window=None, scale=None) -> dict:
    """The keyword arguments of `jax.nn.dot_product_attention` for causal, packed self-attention: segment ids as
    a dense [B, 1, T, T] mask (the API has no segment ids), causal by index, the window as (W - 1, 0)."""
    args = dict(query=q_BxTxNxH, key=k_BxTxGxH, value=v_BxTxGxH, scale=scale, is_causal=True)
    if segment_ids_BxT is not None:
        args["mask"] = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
    if sliding_window is not None:
        args["local_window_size"] = (sliding_window - 1, 0)
    return args


# ---------------------------------------------------------------------------------------------------------------
# Splash (Pallas, TPU).


def _splash_kernel(n_heads: int, n_kv: int, t: int, sliding_window, soft_cap, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = splash_block(t)
    if block is None:
        raise ValueError(f"attention='splash' needs rows of a multiple of 128 tokens, got {t}; use 'xla' or 'auto'")
    if sliding_window is None:
        head_mask = sm.CausalMask((t, t))
    else:
        head_mask = sm.LocalMask((t, t), window_size=(sliding_window - 1, 0), offset=0)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    make = sk.make_splash_mqa if n_kv == 1 else sk.make_splash_mha
    return make(
        sm.MultiHeadMask([head_mask] * n_heads),
        block_sizes=sizes,
        attn_logits_soft_cap=soft_cap,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _splash_local(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, segment_ids_BxT, sliding_window, soft_cap, scale, interpret):
    """Splash on this device's rows and heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    _, t, n, h = q_BxTxNxH.shape
    g = k_BxTxGxH.shape[2]
    kernel = _splash_kernel(n, g, t, sliding_window, soft_cap, interpret)
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    q_BxNxTxH = jnp.swapaxes(q_BxTxNxH * jnp.asarray(scale, q_BxTxNxH.dtype), 1, 2)  # the kernel does not scale
    k, v = jnp.swapaxes(k_BxTxGxH, 1, 2), jnp.swapaxes(v_BxTxGxH, 1, 2)
    if g == 1:  # make_splash_mqa takes k, v as [S, H]
        k, v = k[:, 0], v[:, 0]
    if segment_ids_BxT is None:
        out = jax.vmap(kernel)(q_BxNxTxH, k, v)
    else:
        seg = sk.SegmentIds(q=segment_ids_BxT, kv=segment_ids_BxT)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q_BxNxTxH, k, v, seg)
    return jnp.swapaxes(out, 1, 2).astype(v_BxTxGxH.dtype)


def splash(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, segment_ids_BxT=None, sliding_window=None, soft_cap=None, scale=None):
    """Splash attention, inside a shard_map over the mesh in context (none: on the whole arrays)."""
    local = functools.partial(
        _splash_local,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        scale=scale,
        interpret=platform_lib.context()[0] != "tpu",
    )
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, segment_ids_BxT)
    b, t, n, _ = q_BxTxNxH.shape
    g = k_BxTxGxH.shape[2]
    (rows,) = sharding_lib.spec(("batch",), (b,), mesh)
    (heads,) = sharding_lib.spec(("heads",), (n,), mesh)
    (kv,) = sharding_lib.spec(("kv",), (g,), mesh)
    if heads != kv:  # both head counts must split over the same axes, or neither does
        heads = kv = None
    qspec, kvspec = jax.P(rows, None, heads, None), jax.P(rows, None, kv, None)
    specs = (qspec, kvspec, kvspec) + ((jax.P(rows, None),) if segment_ids_BxT is not None else ())
    fn = jax.shard_map(
        lambda q, k, v, *s: local(q, k, v, s[0] if s else None),
        mesh=mesh,
        in_specs=specs,
        out_specs=qspec,
        check_vma=False,
    )
    return fn(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, *(() if segment_ids_BxT is None else (segment_ids_BxT,)))
