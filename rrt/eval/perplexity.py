"""Held-out perplexity, overall and per exit loop.

Definition (fixed; the CLI and every table use it): the text is tokenized as one stream with no special tokens,
cut into consecutive non-overlapping windows of N tokens (a last partial window is dropped), and every token of a
window except its first is scored given its prefix within the window.
"""

import math

import numpy as np
from tqdm import tqdm

from rrt import model as model_lib
from rrt.eval import scoring


def windows(token_ids: list[int] | np.ndarray, seq_len: int) -> np.ndarray:
    """[W, N] consecutive non-overlapping windows; a last partial window is dropped."""
    ids = np.asarray(token_ids, dtype=np.int32)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def perplexity(
    model: model_lib.Decoder,
    token_ids,
    seq_len: int,
    batch_size: int = 8,
    progress: bool = True,
    scorer=None,
) -> dict:
    """{"ppl", "nll", "tokens", "window_nll", "per_loop": [{"loop", "ppl", "nll", "window_nll"}...]} (nll is the
    mean per scored token; window_nll the mean of each window, from which comparisons estimate their noise)."""
    w = windows(token_ids, seq_len)
    scorer = scorer or scoring.make_scorer(model)
    r = model.cfg.n_loops
    nll_sum = np.zeros(r, np.float64)
    window_nll = []  # [W, R]
    count = 0
    for i in tqdm(range(0, len(w), batch_size), desc="perplexity", disable=not progress):
        batch = w[i : i + batch_size]
        real = len(batch)
        if real < batch_size:  # keep one compiled shape; padded rows are not counted
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        logp, _ = scorer(batch[:, :-1], batch[:, 1:])
        nll_sum -= logp[:, :real].sum(axis=(1, 2))
        window_nll.append(-logp[:, :real].mean(axis=2).T)
        count += real * (seq_len - 1)
    nll = nll_sum / count
    if not np.all(np.isfinite(nll)):
        raise FloatingPointError(f"non-finite perplexity (mean nll per loop {nll.tolist()}): check the checkpoint")
    win_WxR = np.concatenate(window_nll)
    per_loop = [
        {"loop": i + 1, "ppl": math.exp(v), "nll": float(v), "window_nll": win_WxR[:, i].tolist()}
        for i, v in enumerate(nll)
    ]
    last = per_loop[-1]
    return {
        "ppl": last["ppl"],
        "nll": last["nll"],
        "tokens": int(count),
        "window_nll": last["window_nll"],
        "per_loop": per_loop,
    }
