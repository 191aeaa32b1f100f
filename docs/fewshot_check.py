"""rrt's few-shot scores vs an independent Hugging Face transformers reference, on SmolLM2-135M from its GGUF.

    .venv/bin/python docs/fewshot_check.py --data_dir ../shared/data --limit 200 [--tasks ...] [--shots 0]

Both sides score the same prompt strings (built by rrt.eval.tasks from the shared files). Everything after the strings
is independent on the reference side: the tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), the model
(`AutoModelForCausalLM`, torch float32, dequantized by transformers), the lm-eval style context/continuation split,
the log-prob gathering and the metrics are written here, not taken from rrt. The rrt side is
`rrt.eval.fewshot.run_task`, the code path of `python -m rrt.evaluate`. Prints a table of acc / acc_norm / ppl for
both with the difference in points, plus how many requests tokenized differently and the largest per-request
log-prob gap among the others.
Exits 1 if a difference exceeds --tolerance points (default 0.5).

Tokenization differs on a few texts by design: transformers builds the GGUF's tokenizer with plain byte-level
pre-tokenization and ignores `tokenizer.ggml.pre = smollm`, so it splits a run of spaces before a digit differently
("    1" -> "   ", " ", "1"; rrt, as llama.cpp's `smollm` pre-tokenizer specifies: "    ", "1").
"""

import argparse
import math
import os
import sys
import time

import numpy as np

TASKS = "lambada,hellaswag,piqa,winogrande,arc_easy,arc_challenge,openbookqa"


def hf_encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal `_encode_pair` with the Hugging Face tokenizer's default special-token behaviour."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx) :]


def hf_score(model, pairs: list[tuple[list[int], list[int]]], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed continuation log-prob and all-greedy flag per (context ids, continuation ids), right-padded batches."""
    import torch

    ll, greedy = np.zeros(len(pairs)), np.zeros(len(pairs), bool)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        seqs = [(pairs[i][0] + pairs[i][1])[:-1] for i in idx]
        t = max(len(s) for s in seqs)
        ids = torch.zeros((len(idx), t), dtype=torch.long)
        mask = torch.zeros((len(idx), t), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for r, i in enumerate(idx):
            cont = pairs[i][1]
            n = len(seqs[r])
            lp = logp[r, n - len(cont) : n]
            target = torch.tensor(cont)
            ll[i] = lp.gather(-1, target[:, None])[:, 0].double().sum().item()
            greedy[i] = bool((lp.argmax(-1) == target).all())
    return ll, greedy


def hf_metrics(task, reqs, ll: np.ndarray, greedy: np.ndarray) -> dict:
    """acc / acc_norm (char-length normalized) or LAMBADA acc / ppl, written independently of rrt.eval.fewshot."""
    if task.kind == "cloze":
        return {"acc": 100 * greedy.mean(), "ppl": math.exp(-ll.mean())}
    docs: dict[int, list[int]] = {}
    for j, q in enumerate(reqs):
        docs.setdefault(q.doc, []).append(j)
    acc, acc_norm = [], []
    for d, idx in docs.items():
        doc = task.docs[d]
        if task.kind == "mc":
            lens = np.array([len(c) for c in doc["choices"]], float)
        else:
            lens = np.full(len(idx), float(len(doc["continuation"])))
        acc.append(np.argmax(ll[idx]) == doc["gold"])
        acc_norm.append(np.argmax(ll[idx] / lens) == doc["gold"])
    return {"acc": 100 * np.mean(acc), "acc_norm": 100 * np.mean(acc_norm)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="../shared/data")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.5, help="largest allowed |rrt - HF| in points")
    args = p.parse_args()

    import torch
    import transformers

    from rrt import formats
    from rrt.eval import fewshot, scoring
    from rrt.eval import tasks as tasks_lib
    from rrt.formats import gguf

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    path = gguf.smollm2_gguf_path()
    t0 = time.time()
    model = formats.load_model(path)
    tokenizer = formats.load_tokenizer(path)
    scorer = scoring.make_scorer(model)
    d, name = os.path.split(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    print(f"loaded {path} in {time.time() - t0:.0f}s", flush=True)

    rows, worst, times = [], [], {"rrt": 0.0, "hf": 0.0}
    for spec in args.tasks.split(","):
        task = tasks_lib.load(spec, args.data_dir)
        t = time.time()
        res, reqs, ll_rrt = fewshot.run_task(
            scorer, tokenizer, task, args.shots, args.limit, batch_size=args.batch_size
        )
        t_rrt = time.time() - t
        t = time.time()
        pairs = [hf_encode_pair(hf_tok, q.context, q.continuation) for q in reqs]
        ll_hf, greedy_hf = hf_score(hf_model, pairs, args.batch_size)
        ref = hf_metrics(task, reqs, ll_hf, greedy_hf)
        t_hf = time.time() - t
        times["rrt"] += t_rrt
        times["hf"] += t_hf
        mine = fewshot.encode_pairs(tokenizer, [(q.context, q.continuation) for q in reqs])
        same = np.array([a == b for a, b in zip(mine, pairs)])
        tok_diff = int((~same).sum())
        gap = float(np.abs(ll_rrt[-1] - ll_hf)[same].max())  # differently tokenized requests differ by design
        worst.append((task.name, len(reqs), tok_diff, gap, t_rrt, t_hf))
        for metric, ref_val in ref.items():
            val = res[metric] if metric == "ppl" else 100 * res[metric]
            rows.append((task.name, metric, res["n"], val, ref_val, val - ref_val))
        print(f"{task.name}: rrt {t_rrt:.0f}s, HF {t_hf:.0f}s", flush=True)

    print(f"\nSmolLM2-135M (GGUF Q4_1 dequantized), {args.shots}-shot, first {args.limit} items per task\n")
    print("| task | metric | n | rrt | HF transformers | rrt - HF |")
    print("|---|---|---|---|---|---|")
    for task, metric, n, a, b, diff in rows:
        print(f"| {task} | {metric} | {n} | {a:.2f} | {b:.2f} | {diff:+.2f} |")
    print("\n| task | requests | tokenized differently | max abs log-prob gap (same tokens) | rrt s | HF s |")
    print("|---|---|---|---|---|---|")
    for name, n, tok_diff, gap, t_rrt, t_hf in worst:
        print(f"| {name} | {n} | {tok_diff} | {gap:.2e} | {t_rrt:.0f} | {t_hf:.0f} |")
    print(f"\ntotal: rrt {times['rrt']:.0f}s, HF {times['hf']:.0f}s")
    bad = [r for r in rows if r[1] != "ppl" and abs(r[5]) > args.tolerance]
    bad += [r for r in rows if r[1] == "ppl" and abs(r[5]) > args.tolerance / 100 * r[4]]  # ppl: relative
    if bad:
        print(f"FAIL: {len(bad)} metrics differ by more than {args.tolerance} points: {bad}")
        return 1
    print(f"OK: every metric within {args.tolerance} points (ppl within {args.tolerance}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
