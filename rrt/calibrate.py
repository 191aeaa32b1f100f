"""Calibration for activation-aware LoRA init: the second moments of every projection's inputs.

`asvd` LoRA init (rrt.convert) approximates each residual W_l - W' in the norm of the inputs position l's
projection sees in the ORIGINAL model, ||X_l (R_l - s a b)||_F, rather than in the Frobenius norm of the weights.
All it needs of the data is C_l = X_l^T X_l per depth position and per input (q, k and v share one, gate and up
share one: `model.TAPS`), which this module collects:

* tokens: documents of the calibration sources (the training data, or the shared corpora), held-out tails
  excluded, shuffled with a seed, tokenized as training does (BOS/EOS per the tokenizer) and packed into rows of T
  with segment ids and positions restarting per document, as the training rows are; the first ceil(N / T) rows;
* moments: one forward of the full-depth model per batch of rows, a scan over its L layers that records each
  layer's tapped inputs and adds their Gram matrices into a float32 accumulator [L, I, I] per tap. Memory is that
  accumulator, whatever the number of tokens; on a mesh the batch is sharded like training's and the accumulator
  over its first input axis.

The record (`Calibration.record`) names the sources, the row shape and a SHA-256 of the token rows; conversion
stores it in the checkpoint's metadata.
"""

import dataclasses
import hashlib
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from rrt import model as model_lib


@dataclasses.dataclass
class Calibration:
    """Token rows for calibration: inputs, segment ids and positions [N, T] int32, and what they are."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    record: dict


def calibration_rows(sources: Sequence, tokenizer, n_tokens: int, seq_len: int, seed: int = 0) -> Calibration:
    """At least `n_tokens` tokens (whole rows of `seq_len`) from the train splits of `sources`
    (rrt.data.documents.SourceConfig), documents shuffled with `seed` and interleaved across the sources."""
    from rrt.data import documents, tokens

    if n_tokens <= 0 or seq_len <= 0:
        raise ValueError(f"calibration needs n_tokens > 0 and seq_len > 0, got {n_tokens} and {seq_len}")
    encoder = tokens.Encoder(tokenizer, None, None)
    rng = np.random.default_rng(seed)
    readers = []
    for src in sources:
        docs = documents.documents(dataclasses.replace(src, split="train") if src.kind == "files" else src)
        readers.append((docs, iter(rng.permutation(len(docs)))))
    n_rows = math.ceil(n_tokens / seq_len)
    need = n_rows * seq_len
    ids, seg, pos = [], [], []
    have, doc_no, live = 0, 0, list(range(len(readers)))
    while have < need and live:
        for r in list(live):
            docs, order = readers[r]
            i = next(order, None)
            if i is None:
                live.remove(r)
                continue
            doc = encoder(docs[int(i)])
            ids.append(doc)
            seg.append(np.full(len(doc), doc_no, np.int32))
            pos.append(np.arange(len(doc), dtype=np.int32))
            have, doc_no = have + len(doc), doc_no + 1
            if have >= need:
                break
    if have < need:
        raise ValueError(
            f"the calibration data holds {have} tokens, fewer than the {need} asked for (calib_tokens={n_tokens}, "
            f"rows of {seq_len}): lower calib_tokens or add data"
        )
    cut = lambda parts: np.concatenate(parts)[:need].reshape(n_rows, seq_len)  # noqa: E731
    tok_NxT, seg_NxT, pos_NxT = cut(ids), cut(seg), cut(pos)
    seg_NxT = seg_NxT - seg_NxT[:, :1] + 1  # per row: 1, 2, ... (a document cut at a row start restarts at 1)
    pos_NxT = pos_NxT - np.where(seg_NxT == 1, pos_NxT[:, :1], 0)  # and its positions restart at 0
    digest = hashlib.sha256(tok_NxT.tobytes() + seg_NxT.tobytes()).hexdigest()
    names = [getattr(d, "fingerprint", "") for d, _ in readers]
    record = {
        "sources": [dataclasses.asdict(s) for s in sources],
        "fingerprints": names,
        "rows": n_rows,
        "seq_len": seq_len,
        "tokens": need,
        "seed": seed,
        "sha256": digest,
    }
    return Calibration(tok_NxT, seg_NxT, pos_NxT, record)


def _moments_step(cfg: model_lib.ModelConfig):
    """(graphdef, state, rows..., acc) -> acc + this batch's [L, I, I] Gram matrices per tap."""

    def step(graphdef, state, tokens_BxT, segment_ids_BxT, positions_BxT, acc):
        model = nnx.merge(graphdef, state)
        x_BxTxD = model.embed_tokens(tokens_BxT)
        weights = model.weights()

        def layer(x, w):
            taps = {}
            x, _ = model_lib.block(cfg, {**w[0], **w[1]}, x, positions_BxT, segment_ids_BxT, taps=taps)
            gram = {t: jnp.einsum("bti,btj->ij", h, h, preferred_element_type=jnp.float32) for t, h in taps.items()}
            return x, gram

        _, gram_L = jax.lax.scan(layer, x_BxTxD, (weights["layers"], weights["relax"]))
        return {t: acc[t] + gram_L[t] for t in acc}

    return step


def collect_moments(
    cfg: model_lib.ModelConfig,
    params: dict,
    calib: Calibration,
    batch_size: int = 8,
    mesh=None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """{tap: C [L, I, I] float64}, C_l = sum over the calibration tokens of x x^T of the inputs that tap's
    projections see at layer l of the full-depth model `cfg` (flat `params`). With `mesh`, the parameters are
    placed by the sharding rules table, the rows over (data, fsdp), the accumulator over its input axis."""
    if cfg.n_loops != 1 or cfg.relaxed:
        raise ValueError("calibration runs the ORIGINAL full-depth model (n_loops=1, no LoRA)")
    top = int(calib.tokens.max(initial=0))
    if top >= cfg.vocab_size or int(calib.tokens.min(initial=0)) < 0:
        raise ValueError(
            f"calibration token id {top} is outside the model's vocabulary of {cfg.vocab_size}: the calibration "
            "data was tokenized with another tokenizer than the model's"
        )
    dims = {model_lib.tap_of(p): d_in for p, (d_in, _) in cfg.projections().items()}
    cfg = dataclasses.replace(cfg, dtype="float32", remat="none")
    graphdef, abstract_state = nnx.split(model_lib.abstract(cfg))
    expected = model_lib.param_shapes(cfg)
    if set(params) != set(expected):
        raise ValueError(f"calibration: parameters do not match the model: {sorted(set(params) ^ set(expected))}")
    nested = model_lib.nest({k: np.asarray(params[k], np.float32) for k in expected})
    acc_shape = {t: (cfg.n_layers, i, i) for t, i in dims.items()}
    step = _moments_step(cfg)
    if mesh is None:
        state = jax.tree.map(jnp.asarray, nested)
        acc = {t: jnp.zeros(s, jnp.float32) for t, s in acc_shape.items()}
        run = jax.jit(step, static_argnums=0, donate_argnums=5)
        put_rows = jnp.asarray
    else:
        from rrt import sharding as sharding_lib

        def put(tree, shardings):
            return jax.tree.map(
                lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda i: np.asarray(x[i])), tree, shardings
            )

        state = put(nested, sharding_lib.param_shardings(nested, mesh))
        rows_sh = sharding_lib.batch_sharding(mesh)
        acc_sh = {t: _accumulator_sharding(mesh, s) for t, s in acc_shape.items()}
        acc = {t: jax.device_put(jnp.zeros(s, jnp.float32), acc_sh[t]) for t, s in acc_shape.items()}
        run = jax.jit(step, static_argnums=0, donate_argnums=5, out_shardings=acc_sh)
        put_rows = lambda a: put(a, rows_sh)  # noqa: E731
    n, t = calib.tokens.shape
    bar = tqdm(total=n * t, desc="calibration", unit="tok", disable=not progress, file=sys.stderr)
    # Rows are never padded (a padding row would add its inputs to the moments): the last, smaller batch gets a
    # second compiled shape instead.
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        rows = [put_rows(a[sl]) for a in (calib.tokens, calib.segment_ids, calib.positions)]
        acc = run(graphdef, state, *rows, acc)
        bar.update(len(calib.tokens[sl]) * t)
    bar.close()
    if mesh is not None and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        acc = multihost_utils.process_allgather(acc, tiled=True)
    return {t: np.asarray(v, np.float64) for t, v in acc.items()}


def _accumulator_sharding(mesh, shape):
    """[L, I, I] float32 sharded on its first input axis over every mesh axis that divides it (else replicated)."""
    from jax.sharding import NamedSharding, PartitionSpec

    axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    spec = PartitionSpec(None, axes) if axes and shape[1] % size == 0 else PartitionSpec()
    return NamedSharding(mesh, spec)
