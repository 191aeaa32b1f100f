"""Few-shot scoring as lm-eval-harness does it, batched, for every exit loop of a recursive model.

Pipeline: tasks.requests (prompt strings) -> encode_pairs (token ids) -> loglikelihoods (packed batches through
`scoring.make_scorer`) -> task_metrics (acc, acc_norm, perplexity, standard errors, per loop).

Design notes.
* Tokenization is lm-eval's `TemplateLM._encode_pair`: trailing whitespace of the context moves to the front of the
  continuation; the continuation's tokens are those of encode(context + continuation) past len(encode(context)).
  A BOS is prepended when the tokenizer's own configuration says so (`add_bos`), as the harness's HF model does with
  its default `add_bos_token=None`; an empty context is replaced by the prefix token (BOS, else EOS).
* The model sees (context + continuation)[-(max_len + 1):][:-1], the harness's left truncation.
* Batching packs several requests into each row of a fixed [batch_size, T] array, with segment ids (attention never
  crosses requests and positions restart at 0, so a packed request scores as it would alone). T is the power of two
  at or above the task's longest request (capped at max_len), so one task compiles one shape; the last batch is
  padded with empty rows. Packing is best-fit over requests sorted by decreasing length. Only the continuation
  positions of each row (gathered, S per row: the power of two at or above the task's fullest row) go through the
  final norm and head.
* Metrics are lm-eval 0.4.13's `ConfigurableTask.process_results`: acc = argmax of summed log-probs; acc_norm =
  argmax of log-prob divided by the choice's length in *characters* (`len(choice)`, without the leading space; the
  harness's byte-normalized variant is a separate `acc_bytes` metric); LAMBADA's acc = every target token is the
  argmax, and its perplexity = exp(-mean over documents of the target's summed log-prob) (the harness's
  `perplexity` aggregation). Standard errors: sample std (ddof=1) / sqrt(n) for means (lm-eval's `mean_stderr`);
  for perplexity, the delta method ppl * stderr(mean log-prob) (lm-eval bootstraps it).
* Every metric is computed after every loop (exit after loop r, see rrt.eval.scoring); the top-level numbers are the
  last loop's, the full-depth model.
"""

import bisect
import math

import numpy as np
from tqdm import tqdm

from rrt import model as model_lib
from rrt.eval import scoring
from rrt.eval import tasks as tasks_lib

DEFAULT_MAX_LEN = 2048
MIN_ROW_LEN = 16


def prefix_ids(tokenizer) -> list[int]:
    """[BOS] when the tokenizer's configuration adds one to every text, else []."""
    return [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per (context, continuation), as lm-eval's `_encode_pair` (module docstring)."""
    moved = []
    for ctx, cont in pairs:
        n = len(ctx) - len(ctx.rstrip())
        moved.append((ctx[: len(ctx) - n], ctx[len(ctx) - n :] + cont) if n else (ctx, cont))
    texts = sorted({t for ctx, cont in moved for t in ((ctx, ctx + cont) if ctx else (cont,))})
    ids = dict(zip(texts, tokenizer.encode_batch(texts)))
    prefix = prefix_ids(tokenizer)
    out = []
    for (ctx, cont), (orig_ctx, orig_cont) in zip(moved, pairs):
        if not ctx:  # the harness conditions on the prefix token
            cont_ids = ids[cont]
            first = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
            if first is None:
                raise ValueError("an empty context needs a BOS or EOS token to condition on; the tokenizer has none")
            ctx_ids, cont_ids = ([first], cont_ids) if cont_ids[:1] != [first] else (cont_ids[:1], cont_ids[1:])
        else:
            ctx_ids, whole = prefix + ids[ctx], prefix + ids[ctx + cont]
            cont_ids = whole[len(ctx_ids) :]
        if not cont_ids:
            raise ValueError(f"continuation {orig_cont!r} has no tokens of its own after context {orig_ctx[-80:]!r}")
        out.append((ctx_ids, cont_ids))
    return out


def _row_len(longest: int, max_len: int) -> int:
    return min(max_len, max(MIN_ROW_LEN, 1 << (longest - 1).bit_length()))


def pack(lengths: list[int], row_len: int) -> list[list[int]]:
    """Request indices per row: best fit (the fullest row that still has room), longest first; deterministic and
    O(N log N)-ish, for tens of thousands of requests."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, row)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = row_len, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(free, (space - lengths[i], r))
    return rows


def loglikelihoods(
    scorer,
    encoded: list[tuple[list[int], list[int]]],
    batch_size: int = 8,
    max_len: int = DEFAULT_MAX_LEN,
    progress: bool = False,
    desc: str = "scoring",
    pack_rows: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(summed continuation log-prob [R, N], all-greedy flags [R, N]) of encoded (context, continuation) pairs.

    `scorer` is `scoring.make_scorer(model)`. With pack_rows=False every request gets a row of its own."""
    seqs, n_cont = [], []
    for i, (ctx, cont) in enumerate(encoded):
        if len(cont) > max_len:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_len={max_len}")
        if not ctx:
            raise ValueError(f"request {i}: empty context (encode_pairs conditions on a BOS/EOS token instead)")
        seqs.append(np.asarray((ctx + cont)[-(max_len + 1) :], np.int32))
        n_cont.append(len(cont))
    lengths = [len(s) - 1 for s in seqs]
    row_len = _row_len(max(lengths), max_len)
    rows = pack(lengths, row_len) if pack_rows else [[i] for i in range(len(seqs))]
    # Only continuation tokens are scored: the head runs on S gathered positions per row (one shape per task).
    n_scored = min(row_len, _row_len(max(sum(n_cont[i] for i in row) for row in rows), max_len))
    ll, greedy = None, None
    for b in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress):
        batch = rows[b : b + batch_size]
        tokens = np.zeros((batch_size, row_len), np.int32)
        targets = np.zeros_like(tokens)
        segments = np.zeros_like(tokens)
        scored = np.zeros((batch_size, n_scored), np.int32)  # positions into the row; padding scores position 0
        spans = []  # (request, row, start, end) of the request's entries in `scored`
        for r, row in enumerate(batch):
            off, k = 0, 0
            for seg, i in enumerate(row, 1):
                s, n = seqs[i], lengths[i]
                tokens[r, off : off + n], targets[r, off : off + n], segments[r, off : off + n] = s[:-1], s[1:], seg
                c = n_cont[i]
                scored[r, k : k + c] = np.arange(off + n - c, off + n)
                spans.append((i, r, k, k + c))
                off, k = off + n, k + c
        logp_RxBxS, greedy_RxBxS = scorer(tokens, targets, segments, scored)
        if ll is None:
            ll = np.zeros((logp_RxBxS.shape[0], len(seqs)), np.float64)
            greedy = np.zeros((logp_RxBxS.shape[0], len(seqs)), bool)
        for i, r, lo, hi in spans:
            ll[:, i] = logp_RxBxS[:, r, lo:hi].astype(np.float64).sum(-1)
            greedy[:, i] = greedy_RxBxS[:, r, lo:hi].all(-1)
    return ll, greedy


def _stderr(x: np.ndarray) -> float | None:
    """lm-eval's mean_stderr: sample standard deviation (ddof=1) / sqrt(n); None for n < 2."""
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


def task_metrics(
    task: tasks_lib.Task, reqs: list[tasks_lib.Request], ll_RxN: np.ndarray, greedy_RxN: np.ndarray
) -> dict:
    """acc / acc_norm (or LAMBADA's acc / ppl) with standard errors, after every loop; top level = last loop."""
    n_docs = reqs[-1].doc + 1
    by_doc: dict[int, list[int]] = {}
    for j, q in enumerate(reqs):
        by_doc.setdefault(q.doc, []).append(j)
    per_loop = []
    for r in range(ll_RxN.shape[0]):
        if task.kind == "cloze":
            ll = ll_RxN[r]
            acc = greedy_RxN[r].astype(np.float64)
            ppl = math.exp(-ll.mean())
            se = _stderr(ll)
            m = {"acc": acc, "ppl": ppl, "ppl_stderr": None if se is None else ppl * se}
        else:
            acc, acc_norm = np.zeros(n_docs), np.zeros(n_docs)
            for d, idx in by_doc.items():
                doc = task.docs[d]
                lls = ll_RxN[r, idx]
                acc[d] = float(np.argmax(lls) == doc["gold"])
                acc_norm[d] = float(np.argmax(lls / np.asarray(tasks_lib.choice_lengths(task, doc))) == doc["gold"])
            m = {"acc": acc, "acc_norm": acc_norm}
        row = {"loop": r + 1}
        for k, v in m.items():
            if isinstance(v, np.ndarray):
                row[k], row[k + "_stderr"] = float(v.mean()), _stderr(v)
            else:
                row[k] = v
        per_loop.append(row)
    out = {k: v for k, v in per_loop[-1].items() if k != "loop"}
    out.update(n=n_docs, per_loop=per_loop)
    return out


def run_task(
    scorer,
    tokenizer,
    task: tasks_lib.Task,
    shots: int = 0,
    limit: int | None = None,
    seed: int = 1234,
    batch_size: int = 8,
    max_len: int = DEFAULT_MAX_LEN,
    progress: bool = False,
) -> tuple[dict, list[tasks_lib.Request], np.ndarray]:
    """(metrics, requests, summed log-probs [R, N]) of one task."""
    reqs = tasks_lib.requests(task, shots=shots, limit=limit, seed=seed)
    encoded = encode_pairs(tokenizer, [(q.context, q.continuation) for q in reqs])
    ll, greedy = loglikelihoods(scorer, encoded, batch_size, max_len, progress, desc=task.name)
    res = task_metrics(task, reqs, ll, greedy)
    res.update(shots=shots, kind=task.kind, source=task.source)
    return res, reqs, ll


def evaluate_tasks(
    model: model_lib.Decoder,
    tokenizer,
    tasks: list[str],
    data_dir: str | None = None,
    shots: int = 0,
    limit: int | None = None,
    seed: int = 1234,
    batch_size: int = 8,
    progress: bool = True,
    max_len: int = DEFAULT_MAX_LEN,
    scorer=None,
) -> dict[str, dict]:
    """{task name: metrics} for task names (see rrt.eval.tasks.load) or loaded tasks; `scorer` reuses a
    `scoring.make_scorer(model)`. Every task is loaded and checked (`load_tasks`) before the first is scored."""
    loaded = load_tasks(tasks, data_dir, shots)
    scorer = scorer or scoring.make_scorer(model)
    results = {}
    for task in loaded:
        results[task.name], _, _ = run_task(scorer, tokenizer, task, shots, limit, seed, batch_size, max_len, progress)
    return results


def load_tasks(tasks: list, data_dir: str | None = None, shots: int = 0) -> list[tasks_lib.Task]:
    """Task specs (or already loaded tasks) -> loaded tasks; errors for an unknown name, a missing or bad file, two
    tasks of one name, or more shots than a task has other documents, all before any scoring."""
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    loaded, names = [], set()
    for spec in tasks:
        task = spec if isinstance(spec, tasks_lib.Task) else tasks_lib.load(spec, data_dir)
        if task.name in names:
            raise ValueError(f"two tasks are named {task.name!r} (generic tasks are named after their file's stem)")
        if shots > len(task.docs) - 1:
            raise ValueError(f"task {task.name!r}: {shots}-shot needs {shots} other documents; it has {len(task.docs)}")
        names.add(task.name)
        loaded.append(task)
    return loaded
