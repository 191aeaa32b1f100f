"""Held-out perplexity, overall and per exit loop.

Definition (fixed; `rrt.evaluate`, training's held-out metric and every table use it, through `text_perplexity`):
the text is tokenized as one stream with no special tokens and cut into consecutive non-overlapping windows of N
tokens (a last partial window is dropped). Where the tokenizer's own convention adds a BOS to a text (its `add_bos`:
Llama, Gemma), each window is that BOS followed by N - 1 text tokens, and the BOS is context only, never scored; where
it does not (SmolLM2, GPT-2 style), a window is N text tokens and its first is context only. Either way every other
token of a window is scored given its prefix within the window: N - 1 scored tokens per window. So a model is scored
on windows shaped like the documents it was trained on (training prepends the same BOS to every document).
"""

import math

import numpy as np
from tqdm import tqdm

from rrt import model as model_lib
from rrt.eval import scoring


def window_bos(tokenizer) -> int | None:
    """The BOS every window starts with: the tokenizer's BOS where its configuration adds one to a text, else None."""
    return tokenizer.bos_id if tokenizer.add_bos and tokenizer.bos_id is not None else None


def windows(token_ids: list[int] | np.ndarray, seq_len: int, bos_id: int | None = None) -> np.ndarray:
    """[W, N] consecutive non-overlapping windows of the text stream (a last partial window is dropped): N text
    tokens each, or with `bos_id`, that BOS and N - 1 text tokens."""
    ids = np.asarray(token_ids, dtype=np.int32)
    width = seq_len if bos_id is None else seq_len - 1
    n = len(ids) // width if width > 0 else 0
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    w = ids[: n * width].reshape(n, width)
    return w if bos_id is None else np.concatenate([np.full((n, 1), bos_id, np.int32), w], axis=1)


def text_perplexity(
    model: model_lib.Decoder,
    tokenizer,
    text: str,
    seq_len: int,
    batch_size: int = 8,
    progress: bool = True,
    scorer=None,
    max_windows: int = 0,
) -> dict:
    """`perplexity` of `text` under the module's definition (one BOS per window where `tokenizer` adds one), over
    its first `max_windows` windows (0: all). The result also says whether windows began with a BOS ("bos")."""
    bos = window_bos(tokenizer)
    res = perplexity(
        model, tokenizer.encode(text), seq_len, batch_size, progress, scorer, bos_id=bos, max_windows=max_windows
    )
    res["bos"] = bos is not None
    return res


def perplexity(
    model: model_lib.Decoder,
    token_ids,
    seq_len: int,
    batch_size: int = 8,
    progress: bool = True,
    scorer=None,
    bos_id: int | None = None,
    max_windows: int = 0,
) -> dict:
    """{"ppl", "nll", "tokens", "window_nll", "per_loop": [{"loop", "ppl", "nll", "window_nll"}...]} (nll is the
    mean per scored token; window_nll the mean of each window, from which comparisons estimate their noise) of the
    `windows(token_ids, seq_len, bos_id)`, the first `max_windows` of them (0: all)."""
    w = windows(token_ids, seq_len, bos_id)
    if max_windows:
        w = w[:max_windows]
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
