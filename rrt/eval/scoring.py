"""Per-token log-probabilities of a model, after every loop: the primitive under perplexity and few-shot scoring.

Exiting after loop r means applying the final norm and head to the hidden state after loop r (the early-exit
model of the paper); the last loop's value is the ordinary full-depth model. The head is applied one loop at a time
(`lax.map`) so that memory holds one [B, T, V] logits array, not R of them.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrt import model as model_lib


def make_scorer(model: model_lib.Decoder) -> Callable:
    """Returns score(tokens_BxT, targets_BxT, segment_ids_BxT=None, positions_BxS=None) -> (logprob, greedy), numpy.

    logprob[r, b, t] = log p(targets[b, t] | tokens[b, :t+1]) when exiting after loop r + 1; greedy says whether the
    target is that exit's argmax. With positions_BxS (indices into T) only those positions go through the norm and
    head, and both outputs are [R, B, S] (logprob[r, b, s] is that of position positions[b, s]): few-shot scoring
    needs only the continuation tokens, and the head (vocabulary x width) costs as much as several layers per token.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, tokens_BxT, targets_BxT, segment_ids_BxT, positions_BxS):
        m = nnx.merge(graphdef, state)
        positions = None
        if segment_ids_BxT is not None:
            positions = _segment_positions(segment_ids_BxT)
        _, hiddens_RxBxTxD = m(tokens_BxT, positions, segment_ids_BxT, return_loop_hiddens=True)
        if positions_BxS is not None:  # gather the scored positions before the head
            hiddens_RxBxTxD = jnp.take_along_axis(hiddens_RxBxTxD, positions_BxS[None, :, :, None], axis=2)
            targets_BxT = jnp.take_along_axis(targets_BxT, positions_BxS, axis=1)

        def one_exit(h_BxTxD):
            logits = m.logits(h_BxTxD)
            logp = jax.nn.log_softmax(logits, axis=-1)
            tgt = jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
            return tgt, jnp.argmax(logits, axis=-1) == targets_BxT

        return jax.lax.map(one_exit, hiddens_RxBxTxD)

    def run(tokens_BxT, targets_BxT, segment_ids_BxT=None, positions_BxS=None):
        pos = None if positions_BxS is None else jnp.asarray(positions_BxS, jnp.int32)
        logp, greedy = score(state, jnp.asarray(tokens_BxT), jnp.asarray(targets_BxT), segment_ids_BxT, pos)
        return np.asarray(logp), np.asarray(greedy)

    return run


def _segment_positions(segment_ids_BxT: jax.Array) -> jax.Array:
    """Positions restarting at 0 at every segment change."""
    t = segment_ids_BxT.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t), segment_ids_BxT.shape)
    start = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], 1
    )
    first = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
    return idx - first
