"""`python -m rrt.evaluate`: held-out perplexity and few-shot tasks of any model rrt can load.

    python -m rrt.evaluate --source <HF dir | .gguf | rrt dir> --task perplexity --data <text file> \
        --seq_len N --output results.json
    python -m rrt.evaluate --source <...> --tasks lambada,hellaswag,piqa,winogrande,arc_easy,arc_challenge,openbookqa \
        --data_dir ../shared/data --shots K --limit N --output results.json

Results JSON: one key per task. Recursive models also report every exit loop (`per_loop`).

Perplexity: the text is one token stream cut into non-overlapping windows of --seq_len tokens. Where the tokenizer
adds a BOS to a text (its own configuration: Llama, Gemma), each window is that BOS plus seq_len - 1 text tokens and
the BOS is never scored; otherwise (SmolLM2, GPT-2 style) a window's first text token is context only. Either way
seq_len - 1 tokens per window are scored; this is the definition training's held-out metric uses (rrt.eval.perplexity).
"""

import argparse
import json
import os
import sys

from rrt import formats, hostmem
from rrt.eval import perplexity as perplexity_lib


def _at_least(low: int):
    """An argparse type: an integer >= `low`."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rrt.evaluate",
        description=__doc__.splitlines()[0] + "\n\n" + __doc__.split("\n\n")[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        required=True,
        help="HF dir, .gguf file, rrt model dir or training workdir (local or gs://bucket/run)",
    )
    p.add_argument("--task", default=None, help="a single task (same as --tasks)")
    p.add_argument(
        "--tasks", default=None, help="comma-separated: perplexity, the seven paper tasks, mc:<jsonl>, partial:<jsonl>"
    )
    p.add_argument("--data", default=None, help="text file for perplexity")
    p.add_argument(
        "--heldout_fraction",
        type=float,
        default=1.0,
        help="score only the last fraction of --data (e.g. 0.1 for a training corpus's held-out tail)",
    )
    p.add_argument(
        "--seq_len",
        type=_at_least(2),
        default=512,
        help="perplexity window (>= 2 tokens). One BOS starts each window where the tokenizer adds one (Llama, Gemma),"
        " never scored; without (SmolLM2) a window's first text token is context. seq_len - 1 scored per window",
    )
    p.add_argument("--batch_size", type=_at_least(1), default=8)
    p.add_argument("--data_dir", default=None, help="directory holding eval/ (the few-shot sets)")
    p.add_argument("--shots", type=_at_least(0), default=0)
    p.add_argument("--limit", type=_at_least(1), default=None, help="score only the first N items of each task")
    p.add_argument("--seed", type=int, default=1234, help="seed for drawing few-shot examples")
    p.add_argument(
        "--max_len",
        type=_at_least(2),
        default=2048,
        help="few-shot: longest scored sequence (longer requests lose context on the left, as lm-eval)",
    )
    p.add_argument("--dtype", default=None, help="cast parameters (float32, bfloat16)")
    p.add_argument("--output", default=None, help="results JSON path (an existing one needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if args.task and args.tasks:
        p.error("give --task or --tasks, not both")
    args.task_list = [t for t in (args.task or args.tasks or "").split(",") if t]
    if not args.task_list:
        p.error("no task: give --task perplexity or --tasks ...")
    if "perplexity" in args.task_list and not args.data:
        p.error("--task perplexity needs --data <text file>")
    if not 0 < args.heldout_fraction <= 1:
        p.error("--heldout_fraction must be in (0, 1]")
    if args.output and os.path.isdir(args.output):
        p.error(f"--output {args.output} is a directory; give a results file path")
    if args.output and os.path.exists(args.output) and not args.overwrite:
        p.error(f"--output {args.output} exists; pass --overwrite to replace it (or choose another path)")
    if "perplexity" in args.task_list and not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file")
    return args


def heldout_text(path: str, fraction: float) -> str:
    """The last `fraction` of a text file, starting at a line boundary."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{path} is empty")
    if fraction >= 1:
        return text
    cut = text.find("\n", int(len(text) * (1 - fraction)))
    return text[cut + 1 :] if cut >= 0 else text


def markdown_table(results: dict) -> str:
    """One row per (task, metric): value and standard error (accuracies in points), n (tokens for perplexity), and
    the value after every exit loop when the model loops more than once."""
    loops = max((len(res.get("per_loop", [])) for res in results.values()), default=0)
    head = ["task", "metric", "value", "stderr", "n"]
    head += [f"loop {i}" for i in range(1, loops + 1)] if loops > 1 else []
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, res in results.items():
        for metric in ("acc", "acc_norm", "ppl"):
            if metric not in res:
                continue
            fmt = (lambda v: f"{v:.3f}") if metric == "ppl" else (lambda v: f"{100 * v:.2f}")
            stderr = res.get(metric + "_stderr")
            n = res["tokens"] if task == "perplexity" else res.get("n", "")
            cells = [task, metric, fmt(res[metric]), "" if stderr is None else fmt(stderr), str(n)]
            if loops > 1:
                per = [row.get(metric) for row in res.get("per_loop", [])]
                cells += ["" if v is None else fmt(v) for v in per] + [""] * (loops - len(per))
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    from rrt.eval import fewshot

    # Every input is read and checked before anything is scored (or the model loaded): tasks, files, shots.
    text = heldout_text(args.data, args.heldout_fraction) if "perplexity" in args.task_list else None
    fewshot_tasks = fewshot.load_tasks([t for t in args.task_list if t != "perplexity"], args.data_dir, args.shots)
    model = formats.load_model(args.source, dtype=args.dtype)
    tokenizer = formats.load_tokenizer(args.source)
    formats.check_vocab(tokenizer, model.cfg, args.source)
    if text is not None:
        formats.check_positions(args.seq_len, args.source, "--seq_len")
    results = {}
    for task in args.task_list:
        if task == "perplexity":
            res = perplexity_lib.text_perplexity(
                model, tokenizer, text, args.seq_len, args.batch_size, not args.no_progress
            )
            res["data"] = os.path.abspath(args.data)
            res["seq_len"] = args.seq_len
            results["perplexity"] = res
    if fewshot_tasks:
        results.update(
            fewshot.evaluate_tasks(
                model,
                tokenizer,
                fewshot_tasks,
                data_dir=args.data_dir,
                shots=args.shots,
                limit=args.limit,
                seed=args.seed,
                batch_size=args.batch_size,
                progress=not args.no_progress,
                max_len=args.max_len,
            )
        )
    print(markdown_table(results))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.output}")
    return 0


def run():
    hostmem.reexec_with_hugepages()  # rrt/hostmem.py
    sys.exit(main())


if __name__ == "__main__":
    run()
