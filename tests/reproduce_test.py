"""experiments/reproduce/driver.py: the variant list covers the issue, dry-run commands are exact, resume keys and the
computed discussion hold; a slow test runs a tiny reproduction end to end (train, evaluate, report, rerun = no work)."""

import contextlib
import io
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from experiments.reproduce import driver as reproduce  # noqa: E402
from experiments.reproduce import report  # noqa: E402


def dry_run(*args: str) -> list[str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert reproduce.main(["--dry-run", *args]) == 0
    return buf.getvalue().splitlines()


def commands(lines: list[str]) -> list[list[str]]:
    return [shlex.split(line) for line in lines if not line.startswith("#")]


def overrides_of(v: reproduce.Variant) -> dict[str, str]:
    return dict(o.removeprefix("--config.").split("=", 1) for o in v.overrides)


def test_variants_cover_the_issue():
    vs = {v.name: v for v in reproduce.variants("average")}
    o = {n: overrides_of(v) for n, v in vs.items()}
    assert len(vs) == 18 and len(set(vs)) == 18
    assert o["original"]["recursion.loops"] == "1"
    strict = {n for n, x in o.items() if x["recursion.loops"] == "2" and x["recursion.rank_attn"] == "0"}
    cycle_inits = {o[n]["recursion.init"] for n in strict if o[n]["recursion.strategy"] == "cycle"}
    assert {"stepwise", "average", "lower", "random"} <= cycle_inits
    assert o["sequence_average"]["recursion.strategy"] == "sequence"
    relaxed = {
        (x["recursion.rank_attn"], x["recursion.lora_init"])
        for x in o.values()
        if x["recursion.rank_attn"] != "0" and x["recursion.init"] == "average" and "loss.exit_weight" not in x
    }
    assert relaxed == {(str(r), i) for r in (16, 64, 256) for i in ("asvd", "svd", "zero")}
    assert all(x["recursion.rank_attn"] == x["recursion.rank_mlp"] for x in o.values())
    # distillation and early exit: each against the same variant without it (its before_of)
    for name, loss in (("strict_stepwise_kd", "loss.kd_weight"), ("relaxed_avg_r64_svd_exit", "loss.exit_weight")):
        with_it = dict(o[name])
        assert float(with_it.pop(loss)) > 0
        assert with_it == o[vs[name].before_of]
    # zero-init LoRA is the same function at every rank: one before-uptraining evaluation for all
    assert [vs[f"relaxed_avg_r{r}_zero"].before_of for r in (16, 64, 256)] == [None] + ["relaxed_avg_r16_zero"] * 2
    # Average vs Stepwise for relaxed models
    assert o["relaxed_step_r64_svd"] == {**o["relaxed_avg_r64_svd"], "recursion.init": "stepwise"}


def test_every_variant_parses_and_builds():
    """Each variant's overrides parse with rrt.train's flags and give a valid model of the SmolLM2 architecture."""
    from rrt import train
    from rrt.formats import hf

    for v in reproduce.variants("upper"):
        c = reproduce.load_config(reproduce.DEFAULT_CONFIG, ["--config.steps=30", *v.overrides])
        cfg, rec = train.model_config(c, hf.config_from_hf(dict(c.arch)))
        assert cfg.n_layers == 30 and cfg.n_loops == (1 if v.name == "original" else 2)
        assert (cfg.rank_attn > 0) == v.name.startswith("relaxed")
        assert rec.init == overrides_of(v)["recursion.init"]


def test_dry_run_prints_the_exact_commands(tmp_path):
    out = tmp_path / "r"
    lines = dry_run("--out", str(out))
    cmds = commands(lines)
    assert len(cmds) == 18
    assert "12,288 tokens per run" in lines[0]
    for v, argv in zip(reproduce.variants(), cmds):
        assert argv[:7] == [
            sys.executable,
            "-m",
            "rrt.train",
            "--config",
            "configs/reproduce.py",
            "--workdir",
            str(out / v.name),
        ]
        assert argv[7:] == ["--config.steps=12", f"--config.data.cache_dir={out}/token_cache", *v.overrides]
        assert f"# {v.name}: " in "\n".join(lines)
    assert not out.exists()  # a dry run writes nothing


def test_budget_scale_and_global_overrides(tmp_path):
    lines = dry_run(
        "--out", str(tmp_path), "--budget_scale", "2.5", "--config.data.global_batch_size=8", "--only", "strict_random"
    )
    [argv] = commands(lines)
    assert argv[7:14] == [
        "--config.steps=30",
        "--config.optim.warmup_steps=5",
        "--config.checkpoint_every=30",
        "--config.eval.limit=50",
        "--config.eval.max_windows=20",
        f"--config.data.cache_dir={tmp_path}/token_cache",
        "--config.data.global_batch_size=8",
    ]
    assert argv[-1] == "--config.recursion.lora_init=svd"
    assert "30 steps of 8 x 256" in lines[0]
    assert "20 windows" in lines[1] and "first 50 items" in lines[1]


def test_only_and_bad_arguments(tmp_path):
    names = [c[6].rsplit("/", 1)[1] for c in commands(dry_run("--out", str(tmp_path), "--only", "original,sequence"))]
    assert names == ["original", "sequence_<best>"]
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(tmp_path), "--dry-run", "--only", "nope"])
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(tmp_path), "--dry-run", "--steps", "3"])


def fake_eval(nll_by_corpus: dict[str, float], acc: float = 0.5, loops: int = 2, n: int = 40) -> dict:
    per = lambda nll: [
        {"loop": r + 1, "nll": nll + 0.5 * (loops - 1 - r), "ppl": math.exp(nll + 0.5 * (loops - 1 - r))}
        for r in range(loops)
    ]  # noqa: E731
    return {
        "perplexity": {c: {"nll": v, "ppl": math.exp(v), "per_loop": per(v)} for c, v in nll_by_corpus.items()},
        "tasks": {t: {"acc": acc, "n": n, "per_loop": [{"acc": acc}] * loops} for t in reproduce.TASKS},
        "params": {"total": 2_000_000, "embedding": 1_000_000},
    }


def test_sequence_init_is_the_best_stored_perplexity(tmp_path):
    for init, nll in (("stepwise", 3.0), ("average", 2.5), ("lower", 2.7), ("upper", 4.0)):
        with open(tmp_path / f"sequence_{init}.before.json", "w") as f:
            json.dump(fake_eval({"tinystories_val": nll, "tinyshakespeare": nll + 1}), f)
    cmds = commands(dry_run("--out", str(tmp_path), "--only", "sequence"))
    assert cmds[0][6].endswith("/sequence_average") and "--config.recursion.init=average" in cmds[0]


def test_finished_runs_and_eval_keys(tmp_path):
    wd = tmp_path / "run"
    assert reproduce.final_step(str(wd)) is None
    for name in ("20", "40", "60.orbax-checkpoint-tmp-123"):
        (wd / "checkpoints" / name).mkdir(parents=True)
    assert reproduce.final_step(str(wd)) == 40
    path = str(tmp_path / "x.before.json")
    store = reproduce.Store(path, {"overrides": ["--config.steps=40"]})
    store.data["perplexity"]["a"] = {"ppl": 1.0}
    store.save()
    assert reproduce.Store(path, {"overrides": ["--config.steps=40"]}).data["perplexity"] == {"a": {"ppl": 1.0}}
    with pytest.raises(ValueError, match="other settings"):
        reproduce.Store(path, {"overrides": ["--config.steps=80"]})


def results_with(after_nll: dict[str, float]) -> dict[str, report.Result]:
    out = {}
    for v in reproduce.variants("stepwise"):
        nll = after_nll.get(v.name, 3.0)
        before = fake_eval(
            {"tinystories_val": nll + 1, "tinyshakespeare": nll + 2}, loops=1 if v.name == "original" else 2
        )
        after = fake_eval({"tinystories_val": nll, "tinyshakespeare": nll + 1}, loops=1 if v.name == "original" else 2)
        out[v.name] = report.Result(v.name, v.about, v.group, v.overrides, before, after, None, [])
    return out


CORPORA = ["tinystories_val", "tinyshakespeare"]


def test_claims_follow_the_numbers():
    good = {
        "strict_stepwise": 2.0, "strict_average": 2.2, "strict_lower": 2.4, "strict_random": 5.0,
        "relaxed_avg_r16_svd": 1.9, "relaxed_avg_r64_svd": 1.8, "relaxed_avg_r256_svd": 1.7,
        "relaxed_avg_r16_zero": 2.1, "relaxed_avg_r64_zero": 2.05, "relaxed_avg_r256_zero": 2.0,
        "relaxed_step_r64_svd": 1.85, "strict_stepwise_kd": 1.95, "relaxed_avg_r64_svd_exit": 1.81,
        "relaxed_avg_r16_asvd": 1.85, "relaxed_avg_r64_asvd": 1.75, "relaxed_avg_r256_asvd": 1.65,
    }  # fmt: skip
    results = results_with(good)
    for res in results["relaxed_avg_r64_svd_exit"].after["perplexity"].values():
        res["per_loop"][0]["nll"] -= 0.4  # the exit loss makes loop 1 better
    verdicts = {c.finding.split()[0]: c.verdict for c in report.claims(results, CORPORA, reproduce.TASKS)}
    assert set(verdicts.values()) == {"holds"}, verdicts
    bad = dict(good, strict_average=1.5, relaxed_avg_r64_svd=2.3, relaxed_avg_r16_svd=2.5, strict_stepwise_kd=2.5)
    claims = report.claims(results_with(bad), CORPORA, reproduce.TASKS)
    v = {c.finding.split()[0]: c.verdict for c in claims}
    assert v["Stepwise"] == "does not hold" and "`strict_average`" in claims[0].evidence
    assert v["Average"] == "does not hold"
    assert v["SVD"] == "mixed"  # r64: svd 2.3 > zero 2.05; r16, r256 svd better
    assert v["Quality"] == "does not hold"  # rank 256 (1.7) is worse than strict Average (1.5)
    assert v["Distillation"] == "does not hold"
    empty = report.claims({}, CORPORA, reproduce.TASKS)
    assert {c.verdict for c in empty} == {"not measured"}


def with_windows(results: dict, spread: float, seed: int = 0) -> dict:
    """Per-window NLLs around each stored mean (their mean is the stored NLL): what rrt.eval.perplexity stores.
    Every model gets the same window difficulties (shared) plus its own noise of `spread`."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(16)
    for r in results.values():
        for data in (r.before, r.after):
            for res in data["perplexity"].values():
                for row in [res] + res["per_loop"]:
                    own = spread * rng.standard_normal(16)
                    w = row["nll"] + 0.5 * shared + own
                    row["window_nll"] = list(w - w.mean() + row["nll"])
    return results


def test_verdicts_within_the_window_noise_are_inconclusive():
    nll = {"relaxed_avg_r64_svd": 1.80, "relaxed_step_r64_svd": 1.81, "strict_stepwise_kd": 2.95}
    nll |= {"strict_stepwise": 3.0, "relaxed_avg_r16_asvd": 1.0, "relaxed_avg_r64_asvd": 1.0}
    nll |= {"relaxed_avg_r256_asvd": 1.0, "relaxed_avg_r16_svd": 1.9, "relaxed_avg_r256_svd": 1.7}

    def verdicts(spread):
        claims = report.claims(with_windows(results_with(nll), spread), CORPORA, reproduce.TASKS)
        return {c.finding: c for c in claims}

    noisy = verdicts(0.2)  # s.e. of a paired difference ~ 0.2 * sqrt(2 / 16) / sqrt(2) = 0.05 > 0.01 and 0.05
    avg = next(c for f, c in noisy.items() if f.startswith("Average"))
    assert avg.verdict == "inconclusive" and "+- " in avg.evidence  # 1.80 vs 1.81
    assert next(c for f, c in noisy.items() if f.startswith("Distillation")).verdict == "inconclusive"
    asvd = [c for f, c in noisy.items() if "asvd" in f]
    assert [c.verdict for c in asvd] == ["holds", "holds"]  # 1.0 against 1.7-1.9: far beyond the noise
    quiet = verdicts(0.001)  # the same numbers with almost no noise decide
    assert next(c for f, c in quiet.items() if f.startswith("Average")).verdict == "holds"
    assert next(c for f, c in quiet.items() if f.startswith("Distillation")).verdict == "holds"


def test_report_renders_a_skeleton_and_full_results(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    assert reproduce.main(["--out", str(out), "--docs_dir", str(docs), "--report_only"]) == 0
    text = (docs / "RESULTS.md").read_text()
    assert "No run has finished yet" in text and "not measured" in text and "12,288 tokens per run" in text
    assert f"python -m rrt.train --config configs/reproduce.py --workdir {out}/original --config.steps=12" in text
    assert f"python experiments/reproduce/driver.py --out {out} --docs_dir {docs}   # everything" in text
    assert not out.exists()  # --report_only computes and writes nothing in --out
    args, rest = reproduce.parse_args(["--out", str(out), "--docs_dir", str(docs)])
    s = reproduce.settings_from_args(args, rest)
    c = reproduce.load_config(s.config)
    commands = {v.name: f"cmd {v.name}" for v in reproduce.variants("stepwise")}
    full = report.render(s, c, reproduce.eval_settings(c, s), results_with({"strict_random": 6.0}), commands, "x", "o")
    assert "No run has finished" not in full and "18 of 18 variants" in full and "cmd strict_random" in full
    assert f"| `strict_random` | 1.0 | {math.exp(7):.3g} | {math.exp(6):.2f} |" in full
    assert "lambada 40" in full and "about 3.0 points" in full


@pytest.mark.slow
def test_tiny_reproduction_end_to_end_and_resume(tmp_path):
    """A 4-layer source, 5 variants (one with asvd) + the SEQUENCE selection, 2 steps each: trains, evaluates,
    reports; a rerun trains and computes nothing."""
    from flax import nnx

    from rrt import model as model_lib
    from rrt.formats import gguf, rrt_dir
    from rrt.formats import tokenizer as tokenizer_lib

    cfg = model_lib.ModelConfig(
        vocab_size=49152, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128
    )
    src = tmp_path / "src"
    params = model_lib.flat_params(model_lib.Decoder(cfg, rngs=nnx.Rngs(0)))
    rrt_dir.save(str(src), cfg, params, tokenizer=tokenizer_lib.load_tokenizer(gguf.smollm2_gguf_path()))
    out, docs = tmp_path / "out", tmp_path / "docs"
    argv = ["--out", str(out), "--docs_dir", str(docs), "--config", "configs/tiny.py", "--tasks", "piqa,lambada",
            "--only", "original,strict_stepwise,relaxed_avg_r16_svd,relaxed_avg_r16_asvd,strict_stepwise_kd,sequence",
            f"--config.source={src}", "--config.steps=2", "--config.optim.warmup_steps=0",
            "--config.checkpoint_every=2", "--config.eval.limit=3", "--config.eval.max_windows=2",
            "--config.data.global_batch_size=2"]  # fmt: skip
    assert reproduce.main(argv) == 0
    done = {p.name for p in out.glob("*.after.json")}
    assert len(done) == 6 and any(n.startswith("sequence_") for n in done)
    asvd = json.loads((out / "relaxed_avg_r16_asvd.before.json").read_text())  # converted with calibration
    assert asvd["perplexity"]["tinystories_val"]["window_nll"]
    after = json.loads((out / "strict_stepwise.after.json").read_text())
    assert set(after["tasks"]) == {"piqa", "lambada"} and after["tasks"]["piqa"]["n"] == 3
    assert len(after["perplexity"]["tinystories_val"]["per_loop"]) == 2
    text = (docs / "RESULTS.md").read_text()
    assert "6 of 18 variants" in text and (docs / "reproduce_loss.png").exists()
    stamps = {p: p.stat().st_mtime for p in out.glob("*.json")}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert reproduce.main(argv) == 0
    assert ": training (" not in buf.getvalue() and "evaluating" not in buf.getvalue()
    assert {p: p.stat().st_mtime for p in out.glob("*.json")} == stamps
