"""Held-out perplexity of SmolLM2-135M converted to 15 x 2 recursive models, without any uptraining.

    .venv/bin/python docs/conversion_table.py --out docs   # writes docs/CONVERSION.md and docs/conversion_rank.png

Rows: the original; CYCLE and SEQUENCE x {stepwise, average, lower, upper, random} at rank 0 (strict recursion);
CYCLE average and stepwise at ranks {8, 64, 256, full} (relaxed; per-position norms; SVD init). Perplexity is
rrt.eval.perplexity's definition on the held-out tails (last 10% of documents) of TinyStories and Tiny Shakespeare,
the first --windows windows of 256 tokens of each.
"""

import argparse
import math
import os
import sys
import time

from rrt import convert, formats
from rrt import model as model_lib
from rrt.data import documents
from rrt.eval import perplexity
from rrt.formats import gguf
from rrt.formats import tokenizer as tokenizer_lib

CORPORA = {
    "TinyStories": "../shared/data/corpora/tinystories_val.txt",
    "Shakespeare": "../shared/data/corpora/tinyshakespeare.txt",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="docs")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=256)
    args = p.parse_args(argv)
    src = gguf.smollm2_gguf_path()
    tok = tokenizer_lib.load_tokenizer(src)
    ids = {
        name: tok.encode(documents.heldout_text(path, 0.1))[: args.windows * args.seq_len]
        for name, path in CORPORA.items()
    }
    base, params = formats.load(src)
    full_attn, full_mlp = convert.full_rank(base)

    def score(cfg, p):
        m = model_lib.from_params(cfg, p)
        return {
            n: perplexity.perplexity(m, x, args.seq_len, batch_size=4, progress=False)["ppl"] for n, x in ids.items()
        }

    rows = [("original (30 layers)", "-", "-", "-", model_lib.count_params(base), score(base, params))]
    print(rows[-1], flush=True)
    runs = [(s, i, 0) for s in model_lib.STRATEGIES for i in convert.INITS]
    runs += [("cycle", i, r) for i in ("average", "stepwise") for r in (8, 64, 256, "full")]
    for strategy, init, rank in runs:
        t0 = time.time()
        ra, rm = (full_attn, full_mlp) if rank == "full" else (rank, rank)
        rec = convert.Recursion(loops=2, strategy=strategy, init=init, rank_attn=ra, rank_mlp=rm)
        cfg, new, _ = convert.convert(base, params, rec, progress=False)
        rows.append((strategy, init, str(rank), "", model_lib.count_params(cfg), score(cfg, new)))
        print(rows[-1], f"{time.time() - t0:.0f}s", flush=True)
        render(rows, args, argv, planned=len(runs) + 1)
    return 0


def render(rows, args, argv, planned: int) -> None:
    """Writes CONVERSION.md and the plot from the rows measured so far (a stopped run leaves a valid, marked table)."""
    lines = [
        "# SmolLM2-135M as a 15 x 2 recursive model, before uptraining",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'docs/conversion_table.py'] + (argv or sys.argv[1:]))}`",
        "",
        f"Held-out perplexity (first {args.windows} windows of {args.seq_len} tokens of the last 10% of each corpus; "
        "no uptraining). Relaxed rows keep per-position norms and use SVD init (alpha = r). 'full' is rank 576 on "
        "attention (k, v capped at 192) and 576 on the MLP.",
        "",
        "| strategy | init | rank | params (total) | LoRA params | " + " | ".join(f"ppl {n}" for n in CORPORA) + " |",
        "|---|---|---|---|---|" + "---|" * len(CORPORA),
    ]
    for strategy, init, rank, _, counts, ppl in rows:
        cells = [strategy, init, rank, f"{counts['total'] / 1e6:.1f}M", f"{counts['lora'] / 1e6:.1f}M"]
        cells += [f"{ppl[n]:.2f}" if ppl[n] < 1e5 else f"{ppl[n]:.3g}" for n in CORPORA]
        lines.append("| " + " | ".join(cells) + " |")
    os.makedirs(args.out, exist_ok=True)
    plot_path = os.path.join(args.out, "conversion_rank.png")
    _plot(rows, plot_path)
    lines += ["", f"![perplexity against rank]({os.path.basename(plot_path)})", ""]
    if len(rows) < planned:
        lines += [f"**Partial: {len(rows)} of {planned} rows measured; rerun the command for the rest.**", ""]
    with open(os.path.join(args.out, "CONVERSION.md"), "w") as f:
        f.write("\n".join(lines))


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    original = rows[0][5]
    fig, axes = plt.subplots(1, len(CORPORA), figsize=(10, 4))
    for ax, corpus in zip(axes, CORPORA):
        for init in ("average", "stepwise"):
            pts = [(0, r[5][corpus]) for r in rows if r[:3] == ("cycle", init, "0")]
            pts += [
                (576 if r[2] == "full" else int(r[2]), r[5][corpus])
                for r in rows
                if r[0] == "cycle" and r[1] == init and r[2] not in ("0", "-")
            ]
            xs = [max(x, 1) for x, _ in pts]
            ax.plot(xs, [y for _, y in pts], "o-", label=f"{init} init")
        ax.axhline(original[corpus], color="k", ls="--", label="original 30 layers")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="LoRA rank (0 plotted at 1; full = 576)",
            ylabel="perplexity",
            title=f"{corpus} held-out",
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    assert all(math.isfinite(v) for r in rows for v in r[5].values())


if __name__ == "__main__":
    sys.exit(main())
