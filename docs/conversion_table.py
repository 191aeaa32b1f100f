"""SmolLM2-135M converted to 15 x 2 recursive models, without any uptraining: held-out perplexity and top-1
agreement with the original, for every init and for the LoRA inits svd and asvd.

    .venv/bin/python docs/conversion_table.py --out docs   # writes docs/CONVERSION.md and docs/conversion_rank.png

Rows: the original; CYCLE and SEQUENCE x {stepwise, average, lower, upper, random} at rank 0 (strict recursion);
CYCLE {average, stepwise} x ranks {16, 64, 128, 256, full} x LoRA init {svd, asvd} (relaxed; per-position norms);
then asvd average rank 64 with other numbers of calibration tokens. Perplexity is rrt.eval.perplexity's
definition (checked against it on the original) on the held-out tails (last 10% of documents) of TinyStories and
Tiny Shakespeare, the first --windows windows of 256 tokens of each; top-1 agreement is the fraction of those
scored positions where the converted model's argmax equals the original's. asvd calibrates on rrt.convert's
default data: the same two corpora WITHOUT their held-out tails (disjoint from the scored text).
"""

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrt import calibrate, convert, formats
from rrt import model as model_lib
from rrt.data import documents
from rrt.eval import perplexity
from rrt.formats import gguf
from rrt.formats import tokenizer as tokenizer_lib

CORPORA = {
    "TinyStories": "../shared/data/corpora/tinystories_val.txt",
    "Shakespeare": "../shared/data/corpora/tinyshakespeare.txt",
}
RANKS = (16, 64, 128, 256, "full")
CALIB_SWEEP = (2048, 8192, 32768)  # besides the table's --calib_tokens


def stats(cfg, params, windows: dict, original_top1: dict | None) -> tuple[dict, dict, dict]:
    """(perplexity, top-1 agreement with `original_top1`, this model's top-1) per corpus."""
    graphdef, state = nnx.split(model_lib.from_params(cfg, params))

    @jax.jit
    def fwd(state, w_BxT):
        logits = nnx.merge(graphdef, state)(w_BxT[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, w_BxT[:, 1:, None], axis=-1)[..., 0]
        return nll.sum(), jnp.argmax(logits, axis=-1)

    ppl, agree, top1 = {}, {}, {}
    for name, w in windows.items():
        nll, tops = 0.0, []
        for i in range(0, len(w), 4):
            n, t = fwd(state, jnp.asarray(w[i : i + 4]))
            nll, tops = nll + float(n), tops + [np.asarray(t)]
        top1[name] = np.concatenate(tops)
        ppl[name] = math.exp(nll / top1[name].size)
        agree[name] = float(np.mean(top1[name] == original_top1[name])) if original_top1 else 1.0
    return ppl, agree, top1


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="docs")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--calib_tokens", type=int, default=16384)
    args = p.parse_args(argv)
    src = gguf.smollm2_gguf_path()
    tok = tokenizer_lib.load_tokenizer(src)
    ids = {name: tok.encode(documents.heldout_text(path, 0.1)) for name, path in CORPORA.items()}
    bos = perplexity.window_bos(tok)  # rrt.eval.perplexity's definition (SmolLM2 adds none)
    windows = {n: perplexity.windows(x, args.seq_len, bos)[: args.windows] for n, x in ids.items()}
    base, params = formats.load(src)
    full_attn, full_mlp = convert.full_rank(base)

    ppl0, _, top1 = stats(base, params, windows, None)
    check = perplexity.perplexity(
        model_lib.from_params(base, params),
        ids["TinyStories"],
        args.seq_len,
        4,
        False,
        bos_id=bos,
        max_windows=args.windows,
    )
    assert abs(check["ppl"] / ppl0["TinyStories"] - 1) < 1e-4, (check["ppl"], ppl0)
    rows = [
        dict(
            strategy="original (30 layers)",
            init="-",
            rank="-",
            lora_init="-",
            counts=model_lib.count_params(base),
            ppl=ppl0,
            agree={n: 1.0 for n in CORPORA},
            seconds=0.0,
        )
    ]
    print(rows[-1], flush=True)

    calib_cache = {}

    def moments(n_tokens):
        if n_tokens not in calib_cache:
            t0 = time.perf_counter()
            rows_ = calibrate.calibration_rows(convert.calibration_sources(""), tok, n_tokens, args.seq_len)
            calib_cache[n_tokens] = (
                calibrate.collect_moments(base, params, rows_, progress=False),
                time.perf_counter() - t0,
            )
            print(f"calibration on {n_tokens} tokens: {calib_cache[n_tokens][1]:.1f} s", flush=True)
        return calib_cache[n_tokens]

    runs = [(s, i, 0, "-", 0) for s in model_lib.STRATEGIES for i in convert.INITS]
    runs += [
        ("cycle", i, r, li, args.calib_tokens) for i in ("average", "stepwise") for r in RANKS for li in ("svd", "asvd")
    ]
    runs += [("cycle", "average", 64, "asvd", n) for n in CALIB_SWEEP]
    for strategy, init, rank, lora_init, n_calib in runs:
        ra, rm = (full_attn, full_mlp) if rank == "full" else (rank, rank)
        m, calib_s = moments(n_calib) if lora_init == "asvd" else (None, 0.0)
        rec = convert.Recursion(
            loops=2,
            strategy=strategy,
            init=init,
            rank_attn=ra,
            rank_mlp=rm,
            lora_init="svd" if lora_init == "-" else lora_init,
        )
        t0 = time.perf_counter()
        cfg, new, _ = convert.convert(base, params, rec, progress=False, moments=m)
        seconds = time.perf_counter() - t0
        ppl, agree, _ = stats(cfg, new, windows, top1)
        rows.append(
            dict(
                strategy=strategy,
                init=init,
                rank=str(rank),
                lora_init=lora_init,
                counts=model_lib.count_params(cfg),
                ppl=ppl,
                agree=agree,
                seconds=seconds,
                calib_tokens=n_calib,
                calib_seconds=calib_s,
            )
        )
        print({k: v for k, v in rows[-1].items() if k != "counts"}, flush=True)
        render(rows, args, argv, planned=len(runs) + 1)
    return 0


# Static text (not measured): what recursion shares in families with local and global layers.
LOCAL_GLOBAL = [
    "## Families with local and global layers (Mistral, Gemma 2, Gemma 3)",
    "",
    "A strict (rank 0) recursive model of such a family shares the projection weights (q, k, v, o, gate, up, "
    "down, and Gemma 3's q/k-norm weights with the other norms unless per-position norms are on) of each shared "
    "layer across its loops. What it keeps per depth position is the attention kind of the original layer at that "
    "depth: local (sliding window) or global (`layer_types`), the window it implies, and the RoPE base that goes "
    "with the kind (Gemma 3: rope_local_base_freq for local positions, rope_theta for global ones). A shared layer "
    "whose loops land on a local and on a global position therefore attends within the window at the one and over "
    "the whole row at the other; the kind is a per-position flag of the scan (`relax/local`, a constant, not a "
    "parameter), never a property of the shared layer. With `per_position_norms` (relaxed models, by default) every "
    "position also keeps its own norm weights (Gemma 2/3: the four sandwich norms, and q/k-norms). Soft caps, the "
    "query scale (query_pre_attn_scalar) and the embedding scale are the same at every position. So a full-rank "
    "relaxed model of these families reproduces the original exactly (tests/recursive_test.py).",
    "",
]


def _fmt(x: float) -> str:
    return f"{x:.2f}" if x < 1e5 else f"{x:.3g}"


def render(rows, args, argv, planned: int) -> None:
    """Writes CONVERSION.md and the plot from the rows measured so far (a stopped run leaves a valid, marked table)."""
    main_rows = [r for r in rows if r.get("calib_tokens", args.calib_tokens) in (0, args.calib_tokens)]
    lines = [
        "# SmolLM2-135M as a 15 x 2 recursive model, before uptraining",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'docs/conversion_table.py'] + (argv or sys.argv[1:]))}`",
        "",
        f"Held-out perplexity and top-1 agreement with the original (first {args.windows} windows of "
        f"{args.seq_len} tokens of the last 10% of each corpus; no uptraining). Relaxed rows keep per-position norms, "
        "alpha = r. 'full' is rank 576 on attention (k, v capped at 192) and 576 on the MLP. LoRA init `svd` is the "
        "best rank-r fit of each residual's weights; `asvd` the best fit in the norm of the inputs each projection "
        f"sees in the original model, calibrated on {args.calib_tokens:,} tokens of the same corpora's training "
        "parts (disjoint from the scored tails; damping 0.01; rrt.convert's defaults). 'convert s' is the "
        "factorisation time on this machine (2 cores, other jobs running), calibration not included.",
        "",
        "| strategy | init | rank | LoRA init | params (total) | LoRA params | "
        + " | ".join(f"ppl {n}" for n in CORPORA)
        + " | top-1 agreement | convert s |",
        "|---|---|---|---|---|---|" + "---|" * len(CORPORA) + "---|---|",
    ]
    for r in main_rows:
        counts = r["counts"]
        cells = [
            r["strategy"],
            r["init"],
            r["rank"],
            r["lora_init"],
            f"{counts['total'] / 1e6:.1f}M",
            f"{counts['lora'] / 1e6:.1f}M",
        ]
        cells += [_fmt(r["ppl"][n]) for n in CORPORA]
        cells += [f"{100 * np.mean(list(r['agree'].values())):.1f}%", f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    sweep = [r for r in rows if r["lora_init"] == "asvd" and r["init"] == "average" and r["rank"] == "64"]
    if sweep:
        lines += [
            "",
            "## asvd: calibration tokens (CYCLE, average init, rank 64)",
            "",
            "Calibration cost is the forward of the original 30-layer model over the tokens plus the moment "
            "accumulation, on this machine.",
            "",
            "| calibration tokens | calibration s | "
            + " | ".join(f"ppl {n}" for n in CORPORA)
            + " | top-1 agreement |",
            "|---|---|" + "---|" * len(CORPORA) + "---|",
        ]
        for r in sorted(sweep, key=lambda r: r["calib_tokens"]):
            cells = [f"{r['calib_tokens']:,}", f"{r['calib_seconds']:.0f}"] + [_fmt(r["ppl"][n]) for n in CORPORA]
            lines.append("| " + " | ".join(cells + [f"{100 * np.mean(list(r['agree'].values())):.1f}%"]) + " |")
    os.makedirs(args.out, exist_ok=True)
    plot_path = os.path.join(args.out, "conversion_rank.png")
    _plot(main_rows, plot_path)
    lines += ["", f"![perplexity against rank]({os.path.basename(plot_path)})", ""]
    lines += LOCAL_GLOBAL
    if len(rows) < planned:
        lines += [f"**Partial: {len(rows)} of {planned} rows measured; rerun the command for the rest.**", ""]
    with open(os.path.join(args.out, "CONVERSION.md"), "w") as f:
        f.write("\n".join(lines))


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    original = rows[0]["ppl"]
    fig, axes = plt.subplots(1, len(CORPORA), figsize=(11, 4.2))
    for ax, corpus in zip(axes, CORPORA):
        for c, init in enumerate(("average", "stepwise")):
            strict = [r["ppl"][corpus] for r in rows if (r["strategy"], r["init"], r["rank"]) == ("cycle", init, "0")]
            for lora_init, style in (("svd", "o--"), ("asvd", "s-")):
                pts = [(1, y) for y in strict] + [
                    (576 if r["rank"] == "full" else int(r["rank"]), r["ppl"][corpus])
                    for r in rows
                    if r["strategy"] == "cycle" and r["init"] == init and r["lora_init"] == lora_init
                ]
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, color=f"C{c}", label=f"{init}, {lora_init}")
        ax.axhline(original[corpus], color="k", ls=":", label="original 30 layers")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="LoRA rank (strict plotted at 1; full = 576)",
            ylabel="perplexity",
            title=f"{corpus} held-out, before uptraining",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    assert all(math.isfinite(v) for r in rows for v in r["ppl"].values())


if __name__ == "__main__":
    sys.exit(main())
