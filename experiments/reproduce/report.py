"""RESULTS.md for experiments/reproduce/driver.py: the paper's tables at small scale, plots, and a computed discussion.

Everything here reads the JSON files the driver stores in --out (`<name>.before.json`, `<name>.after.json`,
`<name>.train.json`, `<name>/metrics.jsonl`) and renders what exists; a missing number is shown as "–", so the file
renders (as a skeleton) before any run. The discussion's verdicts are computed from the same numbers by `claims`:
the quality measure is the held-out perplexity after uptraining, as the geometric mean over the held-out corpora
(exp of the mean per-token NLL), with the seven tasks' mean accuracy beside it (acc_norm where a task has it, else
acc), whose standard error at these subset sizes is stated with it.
"""

import dataclasses
import json
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

TITLE = "Reproducing the paper's findings at small scale (SmolLM2-135M)"
NA = "–"
CORPUS_NAMES = {"tinystories_val": "TinyStories", "tinyshakespeare": "Shakespeare"}


# ---------------------------------------------------------------------------------------------------------------
# Numbers out of stored evaluations (None when missing).


def task_score(res: dict, loop: int | None = None) -> float:
    """acc_norm where the task has it (multiple choice), else acc; `loop` (1-based) picks an exit."""
    m = res if loop is None else res["per_loop"][loop - 1]
    return m["acc_norm"] if m.get("acc_norm") is not None else m["acc"]


def mean_nll(data: dict, loop: int | None = None) -> float:
    """Mean over the stored corpora of the per-token NLL (last loop, or exit `loop`)."""
    ppl = data["perplexity"]
    if not ppl:
        raise ValueError("no perplexity stored")
    return sum(r["nll"] if loop is None else r["per_loop"][loop - 1]["nll"] for r in ppl.values()) / len(ppl)


def gppl(data: dict | None, corpora: Sequence[str], loop: int | None = None) -> float | None:
    """Geometric-mean perplexity over `corpora` (None unless every one is stored)."""
    if not data or not set(corpora) <= set(data["perplexity"]):
        return None
    nll = [_loop_row(data["perplexity"][c], loop)["nll"] for c in corpora]
    return math.exp(sum(nll) / len(nll))


def ppl(data: dict | None, corpus: str, loop: int | None = None) -> float | None:
    if not data or corpus not in data["perplexity"]:
        return None
    return _loop_row(data["perplexity"][corpus], loop)["ppl"]


def _loop_row(res: dict, loop: int | None) -> dict:
    if loop is None:
        return res
    if loop > len(res["per_loop"]):
        raise IndexError(f"loop {loop} of a model with {len(res['per_loop'])} loops")
    return res["per_loop"][loop - 1]


def acc(data: dict | None, tasks: Sequence[str], loop: int | None = None) -> float | None:
    """Mean task score over `tasks` (None unless every one is stored)."""
    if not data or not tasks or not set(tasks) <= set(data["tasks"]):
        return None
    return sum(task_score(data["tasks"][t], loop) for t in tasks) / len(tasks)


def n_loops(data: dict | None) -> int:
    if not data or not data["perplexity"]:
        return 0
    return len(next(iter(data["perplexity"].values()))["per_loop"])


# ---------------------------------------------------------------------------------------------------------------
# Loading.


@dataclasses.dataclass
class Result:
    name: str
    about: str
    group: str
    overrides: tuple[str, ...]
    before: dict | None
    after: dict | None
    train: dict | None
    metrics: list[dict]
    before_of: str | None = None  # the variant whose before-uptraining evaluation this one shares


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load(out: str, variants: Sequence[Any]) -> dict[str, Result]:
    """Every variant's stored numbers (missing ones as None). `variants` are launch.reproduce.Variant."""
    results = {}
    for v in variants:
        before_name = v.before_of or v.name
        metrics_path = os.path.join(out, v.name, "metrics.jsonl")
        metrics = []
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                metrics = [json.loads(line) for line in f if line.strip()]
        results[v.name] = Result(
            v.name,
            v.about,
            v.group,
            v.overrides,
            _read_json(os.path.join(out, f"{before_name}.before.json")),
            _read_json(os.path.join(out, f"{v.name}.after.json")),
            _read_json(os.path.join(out, f"{v.name}.train.json")),
            metrics,
            v.before_of,
        )
    return results


# ---------------------------------------------------------------------------------------------------------------
# Formatting.


def fmt_ppl(x: float | None) -> str:
    if x is None:
        return NA
    return f"{x:.2f}" if x < 1000 else f"{x:.3g}"


def fmt_acc(x: float | None) -> str:
    return NA if x is None else f"{100 * x:.1f}"


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def params_m(r: Result) -> str:
    data = r.after or r.before
    counts = (data or {}).get("params")
    if not counts:
        return NA
    return f"{(counts['total'] - counts.get('embedding', 0)) / 1e6:.1f}"


def corpus_label(c: str) -> str:
    return CORPUS_NAMES.get(c, c)


def quality_table(results: dict[str, Result], names: Sequence[str], corpora: Sequence[str], tasks) -> str:
    """Non-embedding params, per-corpus perplexity and mean accuracy, before -> after uptraining."""
    head = ["variant", "non-emb. params (M)"]
    for c in corpora:
        head += [f"{corpus_label(c)} ppl before", "after"]
    head += ["avg acc before", "after"]
    rows = []
    for n in names:
        if n not in results:
            continue
        r = results[n]
        row = [f"`{n}`", params_m(r)]
        for c in corpora:
            row += [fmt_ppl(ppl(r.before, c)), fmt_ppl(ppl(r.after, c))]
        row += [fmt_acc(acc(r.before, tasks)), fmt_acc(acc(r.after, tasks))]
        rows.append(row)
    return md_table(head, rows)


def task_table(results: dict[str, Result], phase: str, corpora: Sequence[str], tasks: Sequence[str]) -> str:
    """Every variant: per-loop perplexity (mean over corpora) and each task's score (last loop)."""
    head = ["variant", "ppl loop 1", "ppl last loop"] + list(tasks) + ["avg"]
    rows = []
    for n, r in results.items():
        data = getattr(r, phase)
        row = [f"`{n}`", fmt_ppl(gppl(data, corpora, 1) if n_loops(data) > 1 else None), fmt_ppl(gppl(data, corpora))]
        row += [fmt_acc(task_score(data["tasks"][t]) if data and t in data["tasks"] else None) for t in tasks]
        row.append(fmt_acc(acc(data, tasks)))
        rows.append(row)
    return md_table(head, rows)


# ---------------------------------------------------------------------------------------------------------------
# The discussion: verdicts computed from the numbers.


@dataclasses.dataclass(frozen=True)
class Claim:
    finding: str
    verdict: str  # holds | does not hold | mixed | inconclusive | not measured
    evidence: str


NOISE_Z = 2.0  # a difference counts only beyond 2 standard errors


def log_ppl_diff(a: dict | None, b: dict | None, corpora, loop: int | None = None) -> tuple[float, float] | None:
    """(d, se): d = log gppl(a) - log gppl(b) over `corpora`, and its standard error estimated from the spread
    over perplexity windows: both models score the same windows, so per corpus the paired per-window differences
    of mean NLL give var(d_c) / W_c, and d = mean_c d_c. None when a result lacks per-window NLLs."""
    if not a or not b or not set(corpora) <= set(a["perplexity"]) & set(b["perplexity"]):
        return None
    ds, var = [], 0.0
    for c in corpora:
        wa, wb = (
            _loop_row(a["perplexity"][c], loop).get("window_nll"),
            _loop_row(b["perplexity"][c], loop).get("window_nll"),
        )
        if not wa or not wb or len(wa) != len(wb):
            return None
        d = [x - y for x, y in zip(wa, wb)]
        mean = sum(d) / len(d)
        ds.append(mean)
        var += (sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)) / len(d) if len(d) > 1 else float("inf")
    return sum(ds) / len(ds), math.sqrt(var) / len(ds)


def compare(results, x: str, y: str, corpora, phase: str = "after", loop: int | None = None) -> str | None:
    """'better' | 'worse' (x's perplexity against y's, beyond NOISE_Z standard errors) | 'within noise' | None
    (not both measured). Without per-window NLLs the noise is unknown and the raw order decides."""
    rx, ry = results.get(x), results.get(y)
    dx, dy = (getattr(rx, phase) if rx else None), (getattr(ry, phase) if ry else None)
    gx, gy = gppl(dx, corpora, loop), gppl(dy, corpora, loop)
    if gx is None or gy is None:
        return None
    est = log_ppl_diff(dx, dy, corpora, loop)
    if est is not None and abs(est[0]) <= NOISE_Z * est[1]:
        return "within noise"
    return "better" if gx < gy else "worse"


def _noise(results, x, y, corpora, phase="after", loop=None) -> str:
    rx, ry = results.get(x), results.get(y)
    est = log_ppl_diff(getattr(rx, phase) if rx else None, getattr(ry, phase) if ry else None, corpora, loop)
    if est is None:
        return "noise unknown"
    return f"log-ppl difference {est[0]:+.3f} +- {est[1]:.3f} (1 s.e. over windows)"


def _tally(outcomes: list[str]) -> str:
    """One verdict from several comparisons, each 'better' (the claim's way), 'worse' or 'within noise'."""
    if all(o == "better" for o in outcomes):
        return "holds"
    if all(o == "worse" for o in outcomes):
        return "does not hold"
    if "better" in outcomes and "worse" in outcomes:
        return "mixed"
    return "inconclusive"  # some within noise, the rest all one way


def _q(results: dict[str, Result], name: str, corpora, phase: str = "after") -> float | None:
    r = results.get(name)
    return gppl(getattr(r, phase), corpora) if r else None


def _a(results: dict[str, Result], name: str, tasks, phase: str = "after") -> float | None:
    r = results.get(name)
    return acc(getattr(r, phase), tasks) if r else None


def _pair(results, name, corpora, tasks) -> str:
    return f"`{name}` ppl {fmt_ppl(_q(results, name, corpora))}, acc {fmt_acc(_a(results, name, tasks))}"


def claims(results: dict[str, Result], corpora: Sequence[str], tasks: Sequence[str]) -> list[Claim]:
    """The paper's findings, each judged by held-out perplexity after uptraining (accuracy quoted beside it)."""
    out = []
    q = lambda n, phase="after": _q(results, n, corpora, phase)  # noqa: E731

    # 1. Stepwise is the best init for strict recursion.
    strict = [n for n in ("strict_stepwise", "strict_average", "strict_lower", "strict_random") if n in results]
    have = {n: q(n) for n in strict if q(n) is not None}
    finding = "Stepwise is the best initialization for strict (CYCLE) recursion"
    if "strict_stepwise" in have and len(have) > 1:
        best = min(have, key=have.get)
        before = {n: q(n, "before") for n in strict if q(n, "before") is not None}
        evidence = "after uptraining: " + "; ".join(_pair(results, n, corpora, tasks) for n in have)
        if before:
            evidence += ". Before uptraining, the best was `" + min(before, key=before.get) + "`"
        if best == "strict_stepwise":
            runner = min((n for n in have if n != best), key=have.get)
            outcome = compare(results, best, runner, corpora)
            verdict = "holds" if outcome == "better" else "inconclusive"
            evidence += f". Against the runner-up `{runner}`: {_noise(results, best, runner, corpora)}"
        else:
            outcome = compare(results, best, "strict_stepwise", corpora)
            verdict = "does not hold" if outcome == "better" else "inconclusive"
            evidence += f". Best after uptraining: `{best}`; {_noise(results, best, 'strict_stepwise', corpora)}"
        out.append(Claim(finding, verdict, evidence))
    else:
        out.append(Claim(finding, "not measured", "needs strict_stepwise and another strict init after uptraining"))

    # 2. Average is the best init for relaxed recursion.
    finding = "Average is the best initialization for relaxed recursion (rank 64, SVD LoRA)"
    a, s = q("relaxed_avg_r64_svd"), q("relaxed_step_r64_svd")
    if a is not None and s is not None:
        verdict = _tally([compare(results, "relaxed_avg_r64_svd", "relaxed_step_r64_svd", corpora)])
        evidence = "; ".join(_pair(results, n, corpora, tasks) for n in ("relaxed_avg_r64_svd", "relaxed_step_r64_svd"))
        evidence += "; " + _noise(results, "relaxed_avg_r64_svd", "relaxed_step_r64_svd", corpora)
        a0, s0 = q("relaxed_avg_r64_svd", "before"), q("relaxed_step_r64_svd", "before")
        if a0 is not None and s0 is not None:
            evidence += f" (before uptraining: average {fmt_ppl(a0)}, stepwise {fmt_ppl(s0)})"
        out.append(Claim(finding, verdict, evidence))
    else:
        out.append(Claim(finding, "not measured", "needs relaxed_avg_r64_svd and relaxed_step_r64_svd"))

    # 3. SVD init beats zero init.
    finding = "SVD initialization of the LoRA beats zero initialization"
    wins, parts = [], []
    for rank in (16, 64, 256):
        sv, ze = q(f"relaxed_avg_r{rank}_svd"), q(f"relaxed_avg_r{rank}_zero")
        if sv is None or ze is None:
            continue
        wins.append(compare(results, f"relaxed_avg_r{rank}_svd", f"relaxed_avg_r{rank}_zero", corpora))
        parts.append(f"rank {rank}: svd {fmt_ppl(sv)} vs zero {fmt_ppl(ze)} ({wins[-1]})")
    if wins:
        better = sum(w == "better" for w in wins)
        out.append(Claim(finding, _tally(wins), f"SVD better at {better} of {len(wins)} ranks: " + "; ".join(parts)))
    else:
        out.append(Claim(finding, "not measured", "needs relaxed_avg_r*_svd and _zero pairs"))

    # 4. Quality rises with rank.
    finding = "Quality rises with the LoRA rank (SVD init; rank 0 = strict Average)"
    seq = [
        (r, q(n))
        for r, n in (
            (0, "strict_average"),
            (16, "relaxed_avg_r16_svd"),
            (64, "relaxed_avg_r64_svd"),
            (256, "relaxed_avg_r256_svd"),
        )
    ]
    seq = [(r, v) for r, v in seq if v is not None]
    if len(seq) >= 2:
        names = {0: "strict_average", 16: "relaxed_avg_r16_svd", 64: "relaxed_avg_r64_svd", 256: "relaxed_avg_r256_svd"}
        steps = [compare(results, names[r2], names[r1], corpora) for (r1, _), (r2, _) in zip(seq, seq[1:])]
        overall = compare(results, names[seq[-1][0]], names[seq[0][0]], corpora)
        if all(x == "better" for x in steps):
            verdict = "holds"
        elif overall == "worse":
            verdict = "does not hold"  # the highest rank is worse than the lowest
        else:
            verdict = "inconclusive" if "within noise" in steps + [overall] and "worse" not in steps else "mixed"
        evidence = ", ".join(f"rank {r}: {fmt_ppl(v)}" for r, v in seq)
        evidence += " (each step up in rank: " + ", ".join(steps) + ")"
        zeros = [(r, q(f"relaxed_avg_r{r}_zero")) for r in (16, 64, 256)]
        zeros = [(r, v) for r, v in zeros if v is not None]
        if zeros:
            evidence += "; zero init: " + ", ".join(f"rank {r}: {fmt_ppl(v)}" for r, v in zeros)
        accs = [(r, _a(results, n, tasks)) for r, n in ((0, "strict_average"), (256, "relaxed_avg_r256_svd"))]
        if all(v is not None for _, v in accs):
            evidence += f"; acc rank 0 {fmt_acc(accs[0][1])} vs rank 256 {fmt_acc(accs[1][1])}"
        out.append(Claim(finding, verdict, evidence))
    else:
        out.append(Claim(finding, "not measured", "needs at least two of strict_average and relaxed_avg_r*_svd"))

    # 5. Distillation helps.
    finding = "Distillation from the original model helps uptraining (strict Stepwise)"
    k, n = q("strict_stepwise_kd"), q("strict_stepwise")
    if k is not None and n is not None:
        verdict = _tally([compare(results, "strict_stepwise_kd", "strict_stepwise", corpora)])
        evidence = "; ".join(_pair(results, x, corpora, tasks) for x in ("strict_stepwise_kd", "strict_stepwise"))
        evidence += "; " + _noise(results, "strict_stepwise_kd", "strict_stepwise", corpora)
        out.append(Claim(finding, verdict, evidence))
    else:
        out.append(Claim(finding, "not measured", "needs strict_stepwise and strict_stepwise_kd"))

    # 6. Early-exit training makes the first loop usable at a small cost to the last.
    finding = "Early-exit training improves the intermediate exit (loop 1) at a small cost to the last loop"
    e, b = results.get("relaxed_avg_r64_svd_exit"), results.get("relaxed_avg_r64_svd")
    if e and b and n_loops(e.after) > 1 and n_loops(b.after) > 1:
        e1, b1 = gppl(e.after, corpora, 1), gppl(b.after, corpora, 1)
        e2, b2 = gppl(e.after, corpora), gppl(b.after, corpora)
        if None not in (e1, b1, e2, b2):
            first = compare(results, "relaxed_avg_r64_svd_exit", "relaxed_avg_r64_svd", corpora, loop=1)
            if first == "within noise":
                verdict = "inconclusive"
            else:
                verdict = "holds" if e1 < b1 and e2 <= b2 * 1.05 else "mixed" if e1 < b1 else "does not hold"
            evidence = (
                f"loop 1: {fmt_ppl(e1)} with the exit loss vs {fmt_ppl(b1)} without "
                f"({_noise(results, 'relaxed_avg_r64_svd_exit', 'relaxed_avg_r64_svd', corpora, loop=1)}); last loop: "
                f"{fmt_ppl(e2)} vs {fmt_ppl(b2)} ({100 * (e2 / b2 - 1):+.1f}%; 'small' = within 5%)"
            )
            out.append(Claim(finding, verdict, evidence))
    if not out or out[-1].finding != finding:
        out.append(Claim(finding, "not measured", "needs relaxed_avg_r64_svd and relaxed_avg_r64_svd_exit"))

    # 7. Beyond the paper: the activation-aware (asvd) LoRA init beats the plain SVD init, before and after uptraining.
    for phase in ("before", "after"):
        finding = f"The calibrated asvd LoRA init beats the plain SVD init ({phase} uptraining)"
        wins, parts = [], []
        for rank in (16, 64, 256):
            x, y = f"relaxed_avg_r{rank}_asvd", f"relaxed_avg_r{rank}_svd"
            outcome = compare(results, x, y, corpora, phase)
            if outcome is None:
                continue
            wins.append(outcome)
            parts.append(f"rank {rank}: asvd {fmt_ppl(q(x, phase))} vs svd {fmt_ppl(q(y, phase))} ({outcome})")
        if wins:
            out.append(Claim(finding, _tally(wins), "; ".join(parts)))
        else:
            out.append(Claim(finding, "not measured", "needs relaxed_avg_r*_asvd and _svd pairs"))
    return out


def acc_stderr(results: dict[str, Result], tasks: Sequence[str]) -> float | None:
    """A typical standard error of the mean accuracy: sqrt(p (1 - p) / n) over all items of the scored tasks."""
    for r in results.values():
        data = r.after or r.before
        if data and set(tasks) <= set(data["tasks"]):
            n = sum(data["tasks"][t]["n"] for t in tasks)
            p = acc(data, tasks)
            return math.sqrt(p * (1 - p) / n) if n else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg). Each returns the PNG's file name, or None when it has nothing to show yet.


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rank(results: dict[str, Result], corpora, path: str) -> str | None:
    ranks = (0, 16, 64, 256)
    lines = {}
    for lora_init in ("asvd", "svd", "zero"):
        for phase in ("before", "after"):
            pts = []
            for r in ranks:
                name = "strict_average" if r == 0 else f"relaxed_avg_r{r}_{lora_init}"
                res = results.get(name)
                v = gppl(getattr(res, phase), corpora) if res else None
                if v is not None:
                    pts.append((r, v))
            if pts:
                lines[(lora_init, phase)] = pts
    if not lines:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (lora_init, phase), pts in lines.items():
        ax.plot(
            [ranks.index(r) for r, _ in pts],
            [v for _, v in pts],
            marker="o",
            linestyle="-" if phase == "after" else "--",
            color={"svd": "C0", "zero": "C1", "asvd": "C2"}[lora_init],
            label=f"{lora_init} init, {phase} uptraining",
        )
    orig = results.get("original")
    for phase, style in (("before", ":"), ("after", "-.")):
        v = gppl(getattr(orig, phase), corpora) if orig else None
        if v is not None:
            ax.axhline(v, color="gray", linestyle=style, label=f"original 30 layers, {phase}")
    ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_yscale("log")
    ax.set(
        xlabel="LoRA rank (0: strict, Average init)",
        ylabel="held-out perplexity (geo. mean)",
        title="relaxed 15 x 2 (Average init): perplexity vs rank",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)


def plot_early_exit(results: dict[str, Result], corpora, path: str) -> str | None:
    curves = {}
    for name in ("relaxed_avg_r64_svd", "relaxed_avg_r64_svd_exit"):
        r = results.get(name)
        for phase in ("before", "after"):
            data = getattr(r, phase) if r else None
            if name.endswith("_exit") and phase == "before":
                continue  # the same converted model as relaxed_avg_r64_svd
            k = n_loops(data)
            if k > 1 and gppl(data, corpora) is not None:
                curves[(name, phase)] = [gppl(data, corpora, i) for i in range(1, k + 1)]
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, ((name, phase), ys) in enumerate(curves.items()):
        label = (
            "converted (before uptraining)"
            if phase == "before"
            else f"uptrained {'with' if name.endswith('_exit') else 'without'} early-exit loss"
        )
        ax.plot(range(1, len(ys) + 1), ys, marker="o", color=f"C{i}", label=label)
    ax.set_xticks(range(1, max(len(y) for y in curves.values()) + 1))
    ax.set_yscale("log")
    ax.set(
        xlabel="exit after loop",
        ylabel="held-out perplexity (geo. mean)",
        title="relaxed r64: perplexity per exit loop",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)


def plot_losses(results: dict[str, Result], path: str) -> str | None:
    panels = {
        "original, strict, SEQUENCE, distillation": ("original", "init", "sequence", "kd"),
        "relaxed (rank sweep, Stepwise, early exit)": ("rank", "relaxed_init", "exit"),
    }
    have = [r for r in results.values() if any("loss" in m for m in r.metrics)]
    if not have:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, (title, groups) in zip(axes, panels.items()):
        for i, r in enumerate(x for x in have if x.group in groups):
            recs = [m for m in r.metrics if "loss" in m]
            last = max(int(k.removeprefix("loss/loop")) for k in recs[0] if k.startswith("loss/loop"))
            ax.plot(
                [m["step"] for m in recs],
                [m[f"loss/loop{last}"] for m in recs],
                color=f"C{i % 10}",
                linestyle="-" if i < 10 else "--",
                label=r.name,
            )
        ax.set(xlabel="step", ylabel="train cross-entropy (last loop)", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)


# ---------------------------------------------------------------------------------------------------------------
# The document.


def write(s, c, ev: dict, variants: Sequence[Any], commands: dict[str, str], driver_cmd: str, out_shown: str) -> str:
    """Renders <docs_dir>/RESULTS.md (and its PNGs) from what is stored in s.out; returns its path. `commands` are
    the training command lines by variant, `driver_cmd` the reproduction's, `out_shown` how --out is named."""
    results = load(s.out, variants)
    text = render(s, c, ev, results, commands, driver_cmd, out_shown)
    path = os.path.join(s.docs_dir, "RESULTS.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def render(
    s, c, ev: dict, results: dict[str, Result], commands: dict[str, str], driver_cmd: str, out_shown: str
) -> str:
    """The RESULTS.md text (and, as a side effect, its PNGs in s.docs_dir)."""
    corpora, tasks = ev["corpora"], ev["tasks"]
    os.makedirs(s.docs_dir, exist_ok=True)
    tokens = c.steps * c.data.global_batch_size * c.data.seq_len
    done = [r for r in results.values() if r.after and set(tasks) <= set(r.after["tasks"])]
    plots = {
        "rank": plot_rank(results, corpora, os.path.join(s.docs_dir, "reproduce_rank.png")),
        "exit": plot_early_exit(results, corpora, os.path.join(s.docs_dir, "reproduce_early_exit.png")),
        "loss": plot_losses(results, os.path.join(s.docs_dir, "reproduce_loss.png")),
    }
    img = lambda key, alt: f"![{alt}]({plots[key]})" if plots[key] else f"*({alt}: drawn once the runs exist.)*"  # noqa: E731
    L = []
    L.append(f"# {TITLE}\n")
    L.append(
        "*Generated by `experiments/reproduce/driver.py` from the runs stored in `"
        + out_shown
        + "`: every number, verdict and plot "
        "below comes from those files. Rerun the driver (or add `--report_only`) to regenerate it; do not edit by "
        f"hand.* Status: {len(done)} of {len(results)} variants evaluated after uptraining."
    )
    if not done:
        L.append("\n**No run has finished yet: this is the skeleton; the tables fill in as the runs complete.**")
    L.append("\n## Setup\n")
    limit_note = ", ".join(f"{t} {n}" for t, n in _task_sizes(results, tasks).items()) or str(ev["limit"])
    se = acc_stderr(results, tasks)
    se_note = f"about {fmt_acc(se)} points: smaller differences are noise" if se is not None else "stated once measured"
    L.append(
        f"- Source: SmolLM2-135M (`{c.source}`), 30 layers -> 15 shared layers x 2 loops; CYCLE unless stated.\n"
        f"- Uptraining, the same for every variant: {c.steps} steps x {c.data.global_batch_size} sequences x "
        f"{c.data.seq_len} tokens = **{tokens:,} tokens per run** (budget x{s.budget_scale:g}), "
        f"lr {c.optim.lr:g} (LoRA {c.optim.lora_lr if c.optim.lora_lr is not None else c.optim.lr:g}), "
        f"{c.optim.schedule} schedule, {c.optim.warmup_steps} warmup steps, {c.dtype}; data: the training parts of "
        + ", ".join(corpus_label(x) for x in corpora)
        + ".\n"
        f"- Held-out perplexity: {ev['windows'] or 'all'} windows of {ev['seq_len']} tokens of each held-out tail "
        f"({', '.join(corpus_label(x) for x in corpora)}: the last 10% of documents, never trained on), after each "
        "loop; 'ppl' alone is the last loop's.\n"
        f"- Few-shot ({ev['shots']}-shot, lm-eval-harness prompts, acc_norm where defined, else acc), items per "
        f"task: {limit_note} (the first items of each file). The standard error of a 7-task mean accuracy here is "
        f"{se_note}.\n"
        f"- Quality measure of the discussion: the geometric mean of the held-out perplexities after uptraining.\n"
        + _cost_line(results, s.out)
    )
    L.append("\n## Commands\n")
    L.append("```bash\n" + driver_cmd + "   # everything; rerun to resume\n```\n")
    L.append(
        "Each variant is one `rrt.train` run (the driver runs them one after another, evaluating before and after):\n"
    )
    L.append("<details><summary>the training commands</summary>\n\n```bash")
    for name in results:
        L.append(commands[name])
    L.append("```\n</details>\n")

    L.append("## 1. Initialization of strict recursion (paper: Stepwise best for CYCLE)\n")
    names = ["original", "strict_stepwise", "strict_average", "strict_lower", "strict_random"]
    names += [n for n, r in results.items() if r.group == "sequence"]
    L.append(quality_table(results, names, corpora, tasks) + "\n")
    L.append(_sequence_selection(s, corpora) + "\n")
    L.append("## 2. Relaxed recursion: LoRA rank and initialization\n")
    names = ["strict_average"] + [f"relaxed_avg_r{r}_{i}" for r in (16, 64, 256) for i in ("svd", "zero")]
    names += ["relaxed_step_r64_svd", "original"]
    L.append(quality_table(results, names, corpora, tasks) + "\n")
    L.append(img("rank", "perplexity against LoRA rank") + "\n")
    L.append("## 3. Distillation (strict Stepwise)\n")
    L.append(quality_table(results, ["strict_stepwise", "strict_stepwise_kd"], corpora, tasks) + "\n")
    L.append("## 4. Early exit (relaxed, Average init, rank 64)\n")
    L.append(_exit_table(results, corpora, tasks) + "\n")
    L.append(img("exit", "perplexity per exit loop") + "\n")
    L.append("## 5. Every variant, every task\n")
    L.append("Before uptraining (converted):\n\n" + task_table(results, "before", corpora, tasks) + "\n")
    L.append("After uptraining:\n\n" + task_table(results, "after", corpora, tasks) + "\n")
    L.append("## 6. Loss curves and cost per run\n")
    L.append(img("loss", "training loss curves") + "\n")
    L.append(runs_table(results) + "\n")
    L.append("## Discussion: which findings hold at this scale\n")
    L.append(
        "Each verdict below is computed from the tables (held-out perplexity after uptraining decides; accuracies are "
        "quoted beside it). This is a ~100,000x smaller uptraining budget than the paper's, on a 135M model with a "
        "tiny, narrow corpus, so a finding that does not hold here is not evidence against the paper at scale.\n"
    )
    for cl in claims(results, corpora, tasks):
        L.append(f"- **{cl.finding}: {cl.verdict}.** {cl.evidence}.")
    orig = _q(results, "original", corpora)
    rec = {n: _q(results, n, corpora) for n, r in results.items() if r.group != "original"}
    rec = {n: v for n, v in rec.items() if v is not None}
    if orig is not None and rec:
        best = min(rec, key=rec.get)
        gap = "costs quality" if rec[best] > orig else "costs no quality"
        L.append(
            f"- Recursion {gap} at this budget: the best recursive variant, `{best}` ({params_m(results[best])}M "
            f"non-embedding parameters), reaches perplexity {fmt_ppl(rec[best])} against {fmt_ppl(orig)} for the "
            f"original model ({params_m(results['original'])}M) uptrained on the same tokens."
        )
    L.append("")
    return "\n".join(L)


def runs_table(results: dict[str, Result]) -> str:
    """Per run: first and last training cross-entropy (last loop), and the measured minutes of each stage."""
    head = ["variant", "train CE first step", "last step", "train min", "eval before min", "eval after min"]
    rows = []
    for n, r in results.items():
        recs = [m for m in r.metrics if "loss" in m]
        ce = [None, None]
        if recs:
            last = max(int(k.removeprefix("loss/loop")) for k in recs[0] if k.startswith("loss/loop"))
            ce = [recs[0][f"loss/loop{last}"], recs[-1][f"loss/loop{last}"]]
        mins = [(r.train or {}).get("seconds"), (r.before or {}).get("seconds"), (r.after or {}).get("seconds")]
        cells = [NA if x is None else f"{x / 60:.1f}" for x in mins]
        if r.before_of:
            cells[1] = f"(`{r.before_of}`'s)"
        rows.append([f"`{n}`"] + [NA if x is None else f"{x:.3f}" for x in ce] + cells)
    return md_table(head, rows)


def _task_sizes(results: dict[str, Result], tasks) -> dict[str, int]:
    for r in results.values():
        for data in (r.before, r.after):
            if data and set(tasks) <= set(data["tasks"]):
                return {t: data["tasks"][t]["n"] for t in tasks}
    return {}


def _cost_line(results: dict[str, Result], out: str) -> str:
    """Measured minutes of training and evaluation (each stored evaluation counted once)."""
    train = sum((r.train or {}).get("seconds", 0.0) for r in results.values())
    evals = sum((r.after or {}).get("seconds", 0.0) for r in results.values())
    evals += sum((r.before or {}).get("seconds", 0.0) for r in results.values() if not r.before_of)
    for init in ("stepwise", "average", "lower", "upper"):  # SEQUENCE candidates that were not chosen
        if f"sequence_{init}" not in results:
            evals += (_read_json(os.path.join(out, f"sequence_{init}.before.json")) or {}).get("seconds", 0.0)
    if not train and not evals:
        return ""
    machines = {json.dumps((r.train or {}).get("machine"), sort_keys=True) for r in results.values() if r.train}
    where = "; ".join(json.loads(m)["summary"] for m in machines if m != "null") or platform.platform()
    return f"- Measured cost: {train / 60:.0f} min training + {evals / 60:.0f} min evaluation (stored runs; {where}).\n"


def _sequence_selection(s, corpora) -> str:
    rows = []
    for init in ("stepwise", "average", "lower", "upper"):
        data = _read_json(os.path.join(s.out, f"sequence_{init}.before.json"))
        rows.append([init] + [fmt_ppl(ppl(data, c)) for c in corpora] + [fmt_ppl(gppl(data, corpora))])
    head = ["SEQUENCE init"] + [f"{corpus_label(c)} ppl before" for c in corpora] + ["geo. mean"]
    return "The SEQUENCE variant's init is the best of these before uptraining:\n\n" + md_table(head, rows)


def _exit_table(results: dict[str, Result], corpora, tasks) -> str:
    head = ["variant", "exit"] + [f"{corpus_label(c)} ppl" for c in corpora] + ["avg acc"]
    rows = []
    for name, phase, label in (
        ("relaxed_avg_r64_svd", "before", "converted (before uptraining)"),
        ("relaxed_avg_r64_svd", "after", "uptrained without exit loss"),
        ("relaxed_avg_r64_svd_exit", "after", "uptrained with exit loss (0.1)"),
    ):
        r = results.get(name)
        data = getattr(r, phase) if r else None
        for loop in (1, 2):
            ok = n_loops(data) >= loop
            rows.append(
                [label if loop == 1 else "", f"loop {loop}"]
                + [fmt_ppl(ppl(data, c, loop) if ok else None) for c in corpora]
                + [fmt_acc(acc(data, tasks, loop) if ok else None)]
            )
    return md_table(head, rows)
