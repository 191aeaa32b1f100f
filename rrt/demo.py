"""`python -m rrt.demo`: the main job in miniature, on the embedded defaults (SmolLM2-135M and ../shared/data).

1. evaluates the original 30-layer SmolLM2-135M (held-out perplexity of TinyStories and Shakespeare tails, a few
   few-shot tasks);
2. converts it into a relaxed recursive 15 x 2 model (configs/smollm2_demo.py: Average init, rank-64 LoRA with the
   calibrated asvd init, as rrt.train converts it) and evaluates that, after each loop;
3. uptrains it with `python -m rrt.train --config configs/smollm2_demo.py` (rerunning resumes) and evaluates it;
4. prints a comparison table and saves plots (loss curves; per-loop perplexity) and results.json in --out.
"""

import argparse
import json
import os
import subprocess
import sys
import time

CONFIG = "smollm2_demo"  # the preset (configs/smollm2_demo.py)
TASKS = "hellaswag,arc_easy,piqa"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="rrt.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="output directory (training workdir is <out>/train)")
    p.add_argument("--steps", type=int, default=None, help="override the config's training steps")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=25, help="items per few-shot task")
    p.add_argument("--windows", type=int, default=16, help="perplexity windows of 256 tokens per held-out set")
    return p.parse_args(argv)


def evaluate(name, model, tokenizer, texts: dict[str, str], spec) -> dict:
    from rrt.eval import heldout

    t0 = time.time()
    res = heldout.evaluate(model, tokenizer, spec, texts, progress=True)
    print(f"[demo] evaluated {name} in {time.time() - t0:.0f}s", flush=True)
    return res


def _ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def table(results: dict) -> str:
    corpora = list(next(iter(results.values()))["perplexity"])
    tasks = list(next(iter(results.values()))["tasks"])
    head = ["model", "loop"] + [f"ppl {c}" for c in corpora] + [f"{t} acc_norm" for t in tasks]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in results.items():
        n_loops = len(res["perplexity"][corpora[0]]["per_loop"])
        for r in range(n_loops):
            cells = [name if r == 0 else "", f"{r + 1}/{n_loops}"]
            cells += [_ppl(res["perplexity"][c]["per_loop"][r]["ppl"]) for c in corpora]
            for t in tasks:
                per_loop = res["tasks"][t].get("per_loop")
                m = per_loop[r] if per_loop else res["tasks"][t]
                val = m.get("acc_norm", m.get("acc"))
                cells.append(f"{100 * val:.1f}" if val is not None else "-")
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict, metrics_path: str, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    records = [json.loads(line) for line in open(metrics_path) if line.strip()]
    records = [r for r in records if "loss" in r]
    for key in sorted(k for k in records[0] if k.startswith("loss/loop")):
        ax1.plot([r["step"] for r in records], [r[key] for r in records], label=key.replace("loss/", "exit after "))
    ax1.set(xlabel="step", ylabel="cross-entropy", title="uptraining loss per exit loop")
    ax1.legend()
    corpora = list(next(iter(results.values()))["perplexity"])
    loops = max(len(res["perplexity"][corpora[0]]["per_loop"]) for res in results.values())
    looped = [name for name, res in results.items() if len(res["perplexity"][corpora[0]]["per_loop"]) > 1]
    width = 0.8 / max(len(looped), 1)
    for i, (name, res) in enumerate(results.items()):
        for j, corpus in enumerate(corpora):
            per_loop = res["perplexity"][corpus]["per_loop"]
            start = j * (loops + 1)
            if len(per_loop) == 1:  # a full-depth model: a reference line over its corpus's group
                ax2.hlines(per_loop[0]["ppl"], start - 0.1, start + loops - 0.1, colors=f"C{i}", linestyles="--",
                           label=name if j == 0 else None)  # fmt: skip
                continue
            k = looped.index(name)
            xs = [start + r + k * width for r in range(len(per_loop))]
            ax2.bar(xs, [p["ppl"] for p in per_loop], width, label=name if j == 0 else None, color=f"C{i}")
    ax2.set_yscale("log")
    ax2.set(ylabel="held-out perplexity (log)", title="perplexity after each loop")
    ax2.set_xticks(
        [j * (loops + 1) + r + 0.4 - width / 2 for j in range(len(corpora)) for r in range(loops)],
        [f"{c.split('_')[0][:10]}\nloop {r + 1}" for c in corpora for r in range(loops)],
    )
    ax2.set_ylim(top=ax2.get_ylim()[1] * 50)  # room for the legend above the bars
    ax2.legend(fontsize="small", loc="upper right", framealpha=0.9)
    fig.tight_layout()
    path = os.path.join(out, "demo.png")
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    from rrt import config, formats, train
    from rrt import model as model_lib
    from rrt.eval import heldout

    data = config.shared_data()
    if not os.path.isdir(os.path.join(data, "corpora")) or not os.path.isdir(os.path.join(data, "eval")):
        raise SystemExit(
            f"error: the shared data directory {data} (corpora/ and eval/) is missing: the demo trains on its corpora "
            "and evaluates on its eval sets. Put it beside the checkout (../shared/data) or set RRT_SHARED_DATA."
        )
    os.makedirs(args.out, exist_ok=True)
    c = config.preset("smollm2_demo")
    src = formats.resolve_source("smollm2")
    tokenizer = formats.load_tokenizer(src)
    texts = heldout.heldout_texts(c.data.sources)
    spec = heldout.Spec(
        seq_len=256,
        windows=args.windows,
        tasks=tuple(t for t in args.tasks.split(",") if t),
        data_dir=c.eval.data_dir,
        limit=args.limit,
    )

    results = {}
    base_cfg, base_params = formats.load(src)
    results["original (30 layers)"] = evaluate(
        "the original", model_lib.from_params(base_cfg, base_params), tokenizer, texts, spec
    )
    rec = train.recursion_from_config(c.recursion, base_cfg)
    cfg, params, report = train.convert_calibrated(c, base_cfg, base_params, rec, tokenizer)  # as rrt.train does
    print(f"[demo] converted: {report['params']}", flush=True)
    results["converted 15x2 r64"] = evaluate(
        "the converted model", model_lib.from_params(cfg, params), tokenizer, texts, spec
    )
    del base_params, params

    workdir = os.path.join(args.out, "train")
    cmd = [sys.executable, "-m", "rrt.train", "--config", CONFIG, "--workdir", workdir]
    if args.steps:
        cmd.append(f"--config.steps={args.steps}")
    print("[demo] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    results["uptrained 15x2 r64"] = evaluate("the uptrained model", formats.load_model(workdir), tokenizer, texts, spec)

    md = table(results)
    print("\n" + md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    print(f"\nplot: {plot(results, os.path.join(workdir, 'metrics.jsonl'), args.out)}")
    print(f"results: {os.path.join(args.out, 'results.json')}, {os.path.join(args.out, 'results.md')}")
    return 0


if __name__ == "__main__":
    from rrt import hostmem

    hostmem.reexec_with_hugepages()  # rrt/hostmem.py
    sys.exit(main())
