"""`python experiments/reproduce/driver.py --out runs/reproduce`: the paper's findings, at small scale, on SmolLM2-135M.

Every variant is one training run of configs/reproduce.py (same steps, batch and sequence length: the same token
budget) that differs only by its overrides (`variants`): the original 30-layer model; strict 15 x 2 CYCLE with
Stepwise, Average, Lower and Random init; SEQUENCE with the init (of Stepwise, Average, Lower, Upper) that has the best
held-out perplexity before uptraining; relaxed models (Average init, as in the paper) with LoRA ranks 16, 64 and 256,
each with SVD and zero LoRA init, plus Stepwise at rank 64 (is Average the better init for relaxed models?);
distillation (strict Stepwise with and without); early-exit training (relaxed rank 64 with and without).

For each variant the driver
1. converts the source in-process and evaluates it before uptraining (variants that share their converted model with
   another, the distillation and early-exit runs, reuse that one's evaluation);
2. trains it with `python -m rrt.train --config <config> --workdir <out>/<name> <overrides>` in a subprocess;
3. evaluates the newest checkpoint of the workdir.
An evaluation is held-out perplexity (the tails of every training file, after each loop) and the seven few-shot tasks
(the first `eval.limit` items of each, after each loop). Afterwards it writes the tables, plots and discussion to
<docs_dir>/RESULTS.md (the discussion's verdicts are computed from the numbers).

Resume. Rerunning the same command skips runs whose workdir's newest checkpoint is at the final step, and reuses
every stored evaluation (`<out>/<name>.before.json`, `.after.json`; stored per corpus and per task as they finish).
Each stored evaluation is keyed by the exact config file, overrides and eval settings it was computed with, and
<out>/manifest.json by the driver's settings: a different budget or config in the same --out is an error, not a
silent mix. Extra `--config.x=y` arguments apply to every run (e.g. `--config.data.global_batch_size=32` on a GPU).
`--report_only` rewrites RESULTS.md from what is stored (with nothing stored: the skeleton committed in docs/).
Budget and cost: see configs/reproduce.py.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments.reproduce import report  # noqa: E402

DEFAULT_CONFIG = "configs/reproduce.py"
TASKS = ("lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
STRICT_INITS = ("stepwise", "average", "lower", "random")
SEQUENCE_INITS = ("stepwise", "average", "lower", "upper")
RANKS = (16, 64, 256)
LORA_INITS = ("asvd", "svd", "zero")
KD_WEIGHT = 0.5
EXIT_WEIGHT = 0.1
SEQUENCE = "sequence"  # --only alias of the SEQUENCE variant, whatever init it gets
UNKNOWN_INIT = "<best>"  # the SEQUENCE init before the selection has been computed


@dataclasses.dataclass(frozen=True)
class Variant:
    """One training run: its name (the workdir under --out), overrides, and which table it feeds."""

    name: str
    overrides: tuple[str, ...]
    group: str  # original | init | sequence | rank | relaxed_init | kd | exit
    about: str
    before_of: str | None = None  # the variant whose converted model (and before-uptraining eval) this one shares


def recursion(
    loops: int = 2, strategy: str = "cycle", init: str = "stepwise", rank: int = 0, lora_init: str = "svd"
) -> tuple[str, ...]:
    """Every model-defining override, spelled out (a variant never depends on the config's defaults for these)."""
    return (
        f"--config.recursion.loops={loops}",
        f"--config.recursion.strategy={strategy}",
        f"--config.recursion.init={init}",
        f"--config.recursion.rank_attn={rank}",
        f"--config.recursion.rank_mlp={rank}",
        f"--config.recursion.lora_init={lora_init}",
    )


def sequence_variant(init: str) -> Variant:
    return Variant(
        f"sequence_{init}",
        recursion(strategy="sequence", init=init),
        "sequence",
        f"strict 15 x 2 SEQUENCE, {init} init (the best of {', '.join(SEQUENCE_INITS)} before uptraining)",
    )


def variants(sequence_init: str = UNKNOWN_INIT) -> list[Variant]:
    """Every run of the reproduction, in the order they run."""
    out = [Variant("original", recursion(loops=1), "original", "the original 30-layer SmolLM2-135M")]
    for init in STRICT_INITS:
        out.append(Variant(f"strict_{init}", recursion(init=init), "init", f"strict 15 x 2 CYCLE, {init} init"))
    out.append(sequence_variant(sequence_init))
    for rank in RANKS:
        for lora_init in LORA_INITS:
            # Zero-init LoRA (B = 0) adds nothing before training: every rank's converted model is the same function,
            # so the higher ranks share the lowest rank's before-uptraining evaluation.
            shares = lora_init == "zero" and rank != RANKS[0]
            out.append(
                Variant(
                    f"relaxed_avg_r{rank}_{lora_init}",
                    recursion(init="average", rank=rank, lora_init=lora_init),
                    "rank",
                    f"relaxed 15 x 2 CYCLE, average init, rank-{rank} LoRA, {lora_init} init",
                    before_of=f"relaxed_avg_r{RANKS[0]}_zero" if shares else None,
                )
            )
    out.append(
        Variant(
            "relaxed_step_r64_svd",
            recursion(init="stepwise", rank=64),
            "relaxed_init",
            "relaxed 15 x 2 CYCLE, stepwise init, rank-64 LoRA, svd init",
        )
    )
    out.append(
        Variant(
            "strict_stepwise_kd",
            recursion(init="stepwise") + (f"--config.loss.kd_weight={KD_WEIGHT}",),
            "kd",
            f"strict_stepwise with distillation from the original (kd_weight {KD_WEIGHT})",
            before_of="strict_stepwise",
        )
    )
    out.append(
        Variant(
            "relaxed_avg_r64_svd_exit",
            recursion(init="average", rank=64) + (f"--config.loss.exit_weight={EXIT_WEIGHT}",),
            "exit",
            f"relaxed_avg_r64_svd with the early-exit loss (weight {EXIT_WEIGHT} after loop 1)",
            before_of="relaxed_avg_r64_svd",
        )
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Settings: the config, the budget, the evaluation sizes.


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the driver was asked to do; everything below reads this, never the argparse namespace."""

    out: str  # absolute
    docs_dir: str  # absolute
    config: str  # the config argument as the training command gets it (relative to REPO when inside it)
    budget_scale: float
    global_overrides: tuple[str, ...]
    tasks: tuple[str, ...]
    python: str
    budget: tuple[str, ...]  # the budget's overrides (budget_overrides), first on every command line


def budget_overrides(c, scale: float) -> tuple[str, ...]:
    """--config.steps (always) and, when scaled, the warmup, checkpoint interval and eval sizes (the driver's)."""
    out = [f"--config.steps={scaled(c.steps, scale)}"]
    if scale != 1:
        out.append(f"--config.optim.warmup_steps={scaled(c.optim.warmup_steps, scale, minimum=0)}")
        out.append(f"--config.checkpoint_every={scaled(c.checkpoint_every, scale)}")
        out.append(f"--config.eval.limit={scaled(c.eval.limit, scale)}")
        if c.eval.max_windows:  # 0: every window already
            out.append(f"--config.eval.max_windows={scaled(c.eval.max_windows, scale)}")
    return tuple(out)


def scaled(value: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, int(round(value * scale)))


def load_config(config: str, overrides: Sequence[str] = ()):
    """The ConfigDict `python -m rrt.train --config <config> <overrides>` would see (parsed by the same flags)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["reproduce", "--config", repo_path(config), *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def eval_settings(c, s: Settings) -> dict[str, Any]:
    """Evaluation sizes (0 windows = every window), the tasks and the held-out corpora."""
    return {
        "seq_len": c.eval.seq_len,
        "windows": c.eval.max_windows,
        "limit": c.eval.limit,
        "shots": c.eval.shots,
        "tasks": list(s.tasks),
        "corpora": [corpus_name(src) for src in heldout_sources(c)],
    }


def heldout_sources(c) -> list[dict]:
    return [dict(src) for src in c.data.sources if src.get("kind") == "files" and src.get("heldout_fraction")]


def corpus_name(src: dict) -> str:
    return os.path.splitext(os.path.basename(src["glob"]))[0]


def repo_path(path: str) -> str:
    """Config paths (data files) are relative to the repository root, where rrt.train runs."""
    return path if os.path.isabs(path) else str(REPO / path)


def display_path(path: str) -> str:
    """`path` relative to the repository root when inside it (shorter commands), else absolute."""
    rel = os.path.relpath(path, REPO)
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel


# ---------------------------------------------------------------------------------------------------------------
# Runs: commands, finished checks, stored evaluations.


def run_overrides(s: Settings, v: Variant) -> list[str]:
    """Budget, the shared token cache, the global --config.x=y arguments, then the variant's (the last of a field
    wins). The runs share one token cache (keyed by content and tokenizer), so the corpora are tokenized once."""
    cache = f"--config.data.cache_dir={display_path(os.path.join(s.out, 'token_cache'))}"
    return [*s.budget, cache, *s.global_overrides, *v.overrides]


def workdir(s: Settings, name: str) -> str:
    return os.path.join(s.out, name)


def train_argv(s: Settings, v: Variant) -> list[str]:
    wd = display_path(workdir(s, v.name))
    return [s.python, "-m", "rrt.train", "--config", s.config, "--workdir", wd, *run_overrides(s, v)]


def final_step(wd: str) -> int | None:
    """The newest complete checkpoint step of a training workdir (Orbax names finished steps by their number)."""
    d = os.path.join(wd, "checkpoints")
    steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
    return max(steps) if steps else None


def eval_key(s: Settings, overrides: Sequence[str], ev: dict) -> dict:
    return {"config": s.config, "overrides": list(overrides), "eval": ev}


class Store:
    """One evaluation's JSON (`<out>/<name>.<phase>.json`), written after each corpus and task as it finishes."""

    def __init__(self, path: str, key: dict):
        self.path = path
        self.data = {"key": key, "perplexity": {}, "tasks": {}, "seconds": 0.0}
        if os.path.exists(path):
            with open(path) as f:
                stored = json.load(f)
            if stored.get("key") != key:
                raise ValueError(
                    f"{path} was computed with other settings:\n  stored {stored.get('key')}\n  now    {key}\n"
                    "use a new --out (or delete the file to recompute it)"
                )
            self.data = stored

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)

    def complete(self, ev: dict, with_tasks: bool) -> bool:
        have_ppl = set(ev["corpora"]) <= set(self.data["perplexity"])
        return have_ppl and (not with_tasks or set(ev["tasks"]) <= set(self.data["tasks"]))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation (in-process: jax is imported only here).


class Evaluator:
    """Loads the source once; scores converted models and training workdirs into Stores (rrt.eval.heldout)."""

    def __init__(self, s: Settings, c):
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.join(s.out, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        from rrt import formats
        from rrt.eval import heldout

        self.s = s
        src = formats.resolve_source(c.source)
        if not src:
            raise ValueError("experiments/reproduce/driver.py converts a pretrained model: config.source must name one")
        self.base_cfg, self.base_params = formats.load(src)
        self.tokenizer = formats.load_tokenizer(c.source or c.tokenizer)
        sources = [{**src, "glob": repo_path(src["glob"])} for src in heldout_sources(c)]
        self.heldout = heldout.heldout_texts(sources)
        self.data_dir = repo_path(c.eval.data_dir)

    def converted(self, c):
        """The model `rrt.train` starts from (conversion in float32), and its parameter counts."""
        from rrt import model as model_lib
        from rrt import train

        cfg, rec = train.model_config(c, self.base_cfg)
        _, params, report_ = train.convert_calibrated(
            c, self.base_cfg, self.base_params, rec, self.tokenizer, progress=False
        )
        return model_lib.from_params(cfg, params), report_["params"]

    def trained(self, wd: str):
        from rrt import formats
        from rrt import model as model_lib

        model = formats.load_model(wd)
        return model, model_lib.count_params(model.cfg)

    def evaluate(self, model, store: Store, ev: dict, with_tasks: bool, label: str) -> None:
        from rrt.eval import heldout

        spec = heldout.Spec(
            seq_len=ev["seq_len"],
            windows=ev["windows"],
            tasks=tuple(ev["tasks"]) if with_tasks else (),
            data_dir=self.data_dir,
            shots=ev["shots"],
            limit=ev["limit"],
        )

        def stored(kind: str, name: str, res: dict, seconds: float) -> None:
            store.data[kind][name] = res
            store.data["seconds"] += seconds
            store.save()
            score = res["ppl"] if kind == "perplexity" else report.task_score(res)
            _say(f"{label}: {name} {'ppl ' if kind == 'perplexity' else ''}{score:.3f} ({seconds:.0f}s)")

        texts = {corpus: self.heldout[corpus] for corpus in ev["corpora"]}
        heldout.evaluate(model, self.tokenizer, spec, texts, done=store.data, on_result=stored)


def machine() -> dict[str, Any]:
    """Where the runs ran (the report quotes it beside the measured cost)."""
    import jax

    dev = jax.devices()[0]
    summary = f"{os.cpu_count()} CPU cores, {platform.machine()}, jax {jax.default_backend()} ({dev.device_kind})"
    return {"cpus": os.cpu_count(), "backend": jax.default_backend(), "device": dev.device_kind, "summary": summary}


def _say(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The driver.


class Driver:
    def __init__(self, s: Settings):
        self.s = s
        self.c = load_config(s.config, [*s.budget, *s.global_overrides])
        self.ev = eval_settings(self.c, s)
        self._evaluator: Evaluator | None = None
        self.configs: dict[str, Any] = {}

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.s, self.c)
        return self._evaluator

    def config(self, v: Variant):
        if v.name not in self.configs:
            self.configs[v.name] = load_config(self.s.config, run_overrides(self.s, v))
        return self.configs[v.name]

    def store(self, v: Variant, phase: str) -> Store:
        return Store(
            os.path.join(self.s.out, f"{v.name}.{phase}.json"),
            eval_key(self.s, run_overrides(self.s, v), self.ev),
        )

    def before(self, v: Variant, with_tasks: bool = True) -> Store:
        """The before-uptraining evaluation of `v`'s converted model (computing what is missing)."""
        store = self.store(v, "before")
        if not store.complete(self.ev, with_tasks):
            _say(f"{v.name}: converting and evaluating before uptraining")
            model, counts = self.evaluator.converted(self.config(v))
            store.data["params"] = counts
            self.evaluator.evaluate(model, store, self.ev, with_tasks, f"{v.name} before")
            del model
        return store

    def select_sequence_init(self) -> str:
        """The SEQUENCE init with the lowest mean held-out log-perplexity before uptraining."""
        scores = {}
        for init in SEQUENCE_INITS:
            store = self.before(sequence_variant(init), with_tasks=False)
            scores[init] = report.mean_nll(store.data)
        best = min(scores, key=scores.get)
        _say(
            "SEQUENCE init by held-out perplexity before uptraining: "
            + ", ".join(f"{k} {math.exp(v):.2f}" for k, v in scores.items())
            + f" -> {best}"
        )
        return best

    def stored_sequence_init(self) -> str:
        """The selection, if every candidate's stored perplexity is there (dry runs compute nothing)."""
        scores = {}
        for init in SEQUENCE_INITS:
            path = os.path.join(self.s.out, f"sequence_{init}.before.json")
            if not os.path.exists(path):
                return UNKNOWN_INIT
            with open(path) as f:
                data = json.load(f)
            if not set(self.ev["corpora"]) <= set(data.get("perplexity", {})):
                return UNKNOWN_INIT
            scores[init] = report.mean_nll(data)
        return min(scores, key=scores.get)

    def train(self, v: Variant) -> None:
        c = self.config(v)
        wd = workdir(self.s, v.name)
        if final_step(wd) == c.steps:
            return
        argv = train_argv(self.s, v)
        log = os.path.join(self.s.out, "logs", f"{v.name}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        _say(f"{v.name}: training ({shlex.join(argv)}); log {log}")
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(self.s.out, "jax_cache"))
        t0 = time.time()
        with open(log, "a") as f:
            rc = subprocess.run(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc:
            with open(log) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"training {v.name} failed (exit status {rc}); the end of {log}:\n{tail}")
        if final_step(wd) != c.steps:
            raise RuntimeError(f"training {v.name} ended without a checkpoint at step {c.steps} in {wd}; see {log}")
        timing_path = os.path.join(self.s.out, f"{v.name}.train.json")
        timing = {"seconds": 0.0}
        if os.path.exists(timing_path):
            with open(timing_path) as f:
                timing = json.load(f)
        timing["seconds"] += time.time() - t0
        timing["command"] = shlex.join(argv)
        timing["machine"] = machine()
        timing["loadavg_at_end"] = os.getloadavg()[0]
        with open(timing_path, "w") as f:
            json.dump(timing, f, indent=1)
        _say(f"{v.name}: trained in {time.time() - t0:.0f}s")

    def after(self, v: Variant) -> Store:
        store = self.store(v, "after")
        if not store.complete(self.ev, True):
            _say(f"{v.name}: evaluating after uptraining")
            model, counts = self.evaluator.trained(workdir(self.s, v.name))
            store.data["params"] = counts
            self.evaluator.evaluate(model, store, self.ev, True, f"{v.name} after")
            del model
        return store


def select(all_variants: list[Variant], only: Sequence[str]) -> list[Variant]:
    if not only:
        return all_variants
    names = {v.name for v in all_variants}
    unknown = [n for n in only if n not in names and n != SEQUENCE]
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {unknown}; expected some of {sorted(names)} or {SEQUENCE!r}")
    return [v for v in all_variants if v.name in only or (v.group == "sequence" and SEQUENCE in only)]


def check_manifest(s: Settings, c) -> None:
    """One --out holds one reproduction: the config, budget and global overrides may not change between reruns."""
    path = os.path.join(s.out, "manifest.json")
    manifest = {
        "config": s.config,
        "budget_scale": s.budget_scale,
        "global_overrides": list(s.global_overrides),
        "steps": c.steps,
    }
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if {k: stored.get(k) for k in manifest} != manifest:
            raise SystemExit(f"{path} records another reproduction ({stored}); this one is {manifest}: use a new --out")
    else:
        os.makedirs(s.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="experiments/reproduce/driver.py",
        description=__doc__.splitlines()[0],
        epilog="Any --config.x=y argument is passed to every training run (after the budget, before the variant's).",
    )
    p.add_argument("--out", required=True, help="directory of the runs and stored evaluations (rerun to resume)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="training config file (relative to the repository)")
    p.add_argument("--budget_scale", type=float, default=1.0, help="multiplies steps, warmup and eval sizes")
    p.add_argument("--only", default="", help="comma-separated variant names (see --dry-run); 'sequence' = SEQUENCE")
    p.add_argument("--tasks", default=",".join(TASKS), help="few-shot tasks (default: the paper's seven)")
    p.add_argument("--docs_dir", default=str(REPO / "docs"), help="where RESULTS.md and the plots are written")
    p.add_argument("--dry-run", action="store_true", help="list the variants and their commands; run nothing")
    p.add_argument("--report_only", action="store_true", help="only (re)write RESULTS.md from the stored results")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--config.") and "=" in a)]
    if bad:
        p.error(f"unrecognized arguments {bad} (training overrides must be --config.x=y)")
    if args.budget_scale <= 0:
        p.error(f"--budget_scale must be positive, got {args.budget_scale}")
    return args, rest


def settings_from_args(args: argparse.Namespace, overrides: list[str]) -> Settings:
    config = args.config if os.path.isabs(args.config) else display_path(os.path.abspath(args.config))
    if not os.path.isfile(repo_path(config)):
        raise SystemExit(f"--config: no such file {args.config!r}")
    tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; expected some of {list(TASKS)}")
    return Settings(
        out=os.path.abspath(args.out),
        docs_dir=os.path.abspath(args.docs_dir),
        config=config,
        budget_scale=args.budget_scale,
        global_overrides=tuple(overrides),
        tasks=tasks,
        python=sys.executable,
        budget=budget_overrides(load_config(config), args.budget_scale),
    )


def dry_run(driver: Driver, chosen: list[Variant]) -> None:
    s, c = driver.s, driver.c
    tokens = c.steps * c.data.global_batch_size * c.data.seq_len
    ev = driver.ev
    print(
        f"# config {s.config}, budget x{s.budget_scale:g}: {c.steps} steps of {c.data.global_batch_size} x "
        f"{c.data.seq_len} = {tokens:,} tokens per run; {len(chosen)} runs"
    )
    print(
        f"# eval: {ev['windows'] or 'all'} windows of {ev['seq_len']} tokens of {', '.join(ev['corpora'])}; "
        f"first {ev['limit']} items of {', '.join(ev['tasks'])} ({ev['shots']}-shot)"
    )
    if any(v.group == "sequence" for v in chosen) and driver.stored_sequence_init() == UNKNOWN_INIT:
        print(f"# {SEQUENCE}: init chosen before training, by held-out perplexity of {', '.join(SEQUENCE_INITS)}")
    for v in chosen:
        shares = f" (before-uptraining eval: {v.before_of}'s)" if v.before_of else ""
        print(f"# {v.name}: {v.about}{shares}")
        print(f"#   overrides: {' '.join(v.overrides)}")
        print(shlex.join(train_argv(s, v)))


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    s = settings_from_args(args, overrides)
    driver = Driver(s)
    only = [n for n in args.only.split(",") if n]
    all_variants = variants(driver.stored_sequence_init())
    chosen = select(all_variants, only)
    if args.dry_run:
        dry_run(driver, chosen)
        return 0
    if not args.report_only:
        check_manifest(s, driver.c)
        t0 = time.time()
        if any(v.group == "sequence" for v in chosen):
            best = driver.select_sequence_init()
            all_variants = variants(best)
            chosen = select(all_variants, only)
        by_name = {v.name: v for v in all_variants}
        for v in chosen:
            driver.before(by_name[v.before_of] if v.before_of else v)
            driver.train(v)
            driver.after(v)
        _say(f"all {len(chosen)} variants done in {time.time() - t0:.0f}s")
    shown = lambda a: ["python", *a[1:]] if a[0] == s.python else a  # noqa: E731
    commands = {v.name: shlex.join(shown(train_argv(s, v))) for v in all_variants}
    driver_args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report_only"]
    driver_cmd = shlex.join(["python", "experiments/reproduce/driver.py", *driver_args])
    path = report.write(s, driver.c, driver.ev, all_variants, commands, driver_cmd, display_path(s.out))
    _say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
