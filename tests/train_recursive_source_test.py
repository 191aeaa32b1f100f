"""Convert, then train: `rrt.convert` writes a recursive rrt directory; `rrt.train --config.source=<it>` trains it as
it is (no second conversion), refuses recursion fields that disagree with it, and distils only from an explicit
`--config.teacher`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import trainrun
from flax import nnx

from rrt import config, train
from rrt import model as model_lib
from rrt.data import pipeline
from rrt.formats import rrt_dir

VANILLA = model_lib.ModelConfig(
    vocab_size=49152, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, rope_theta=10000.0
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(full-depth rrt dir, the recursive rrt dir rrt.convert made of it: 2 x 2, rank 4 like the tiny preset)."""
    import needs

    from rrt.formats import gguf
    from rrt.formats import tokenizer as tokenizer_lib

    try:
        tok = tokenizer_lib.load_tokenizer(gguf.smollm2_gguf_path())
    except FileNotFoundError as e:
        needs.missing(str(e))
    if not os.path.isdir(config.shared_data()):
        needs.missing(f"the shared data {config.shared_data()} is missing")
    root = tmp_path_factory.mktemp("rec_source")
    vanilla = str(root / "vanilla")
    params = model_lib.flat_params(model_lib.Decoder(VANILLA, rngs=nnx.Rngs(1)))
    params["embed"] = params["embed"] * 40  # logits far from uniform: its loss is no fresh init's ln(V)
    rrt_dir.save(vanilla, VANILLA, params, tokenizer=tok)
    rec = str(root / "recursive")
    cmd = [sys.executable, "-m", "rrt.convert", "--source", vanilla, "--out", rec, "--loops", "2", "--rank", "4"]
    p = subprocess.run(cmd, cwd=trainrun.REPO, env=trainrun.env(1), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return vanilla, rec


def _config(source: str, **overrides):
    c = config.preset("tiny")
    c.source = source
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def test_trains_the_converted_directory_as_it_is(dirs, tmp_path):
    _, rec = dirs
    wd = tmp_path / "run"
    trainrun.run(wd, f"--config.source={rec}", "--config.optim.warmup_steps=0", steps=1)
    log = trainrun.tail(f"{wd}.log", 100000)
    assert "no conversion" in log and "converted" not in log
    with open(wd / rrt_dir.META) as f:
        meta = json.load(f)
    src_cfg, src_params = rrt_dir.load(rec)
    assert model_lib.ModelConfig.from_dict(meta["model"]) == src_cfg
    assert meta["conversion"] == {"source": os.path.abspath(rec), "recursion": None}
    # Step 1's logged loss is the source's own parameters' loss on the first batch: a numpy log-softmax of the
    # source model's logits (no reconversion, no fresh init in between).
    (rec1,) = trainrun.metrics(wd).values()
    batch = _first_batch(rec, wd)
    logp = _logp(rec, batch)
    nll = -np.take_along_axis(logp, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
    mask = batch["loss_mask"]
    want = (nll * mask).sum() / mask.sum()
    assert abs(want - np.log(VANILLA.vocab_size)) > 1, want
    assert rec1["loss"] == pytest.approx(want, rel=1e-4)


# default run under 20 min on CI; test_trains_the_converted_directory_as_it_is trains a converted directory
@pytest.mark.slow
def test_distils_from_the_named_teacher(dirs, tmp_path):
    """KD from the converted directory with --config.teacher=<a full-depth dir>: step 1's logged KL is the numpy
    KL(teacher || source) on the first batch. (The teacher is another model than the one converted, which a rank-4
    conversion reproduces almost exactly, so that the KL is large.)"""
    _, rec = dirs
    vanilla = str(tmp_path / "teacher")
    params = model_lib.flat_params(model_lib.Decoder(VANILLA, rngs=nnx.Rngs(2)))
    rrt_dir.save(vanilla, VANILLA, {k: v * 40 if k == "embed" else v for k, v in params.items()})
    wd = tmp_path / "kd"
    kd = ("--config.loss.kd_weight=0.5", f"--config.teacher={vanilla}", "--config.optim.warmup_steps=0")
    trainrun.run(wd, f"--config.source={rec}", *kd, steps=1)
    (rec1,) = trainrun.metrics(wd).values()
    batch = _first_batch(rec, wd)
    student, teacher = _logp(rec, batch), _logp(vanilla, batch)
    mask = batch["loss_mask"]
    kl = ((np.exp(teacher) * (teacher - student)).sum(-1) * mask).sum() / mask.sum()
    assert kl > 0.1 and rec1["kl/loop2"] == pytest.approx(kl, rel=1e-3)


def _first_batch(source, wd):
    c = _config(source)
    c.data.seq_len = 32  # trainrun.SMALL's
    it = pipeline.make_iterator(train.data_config(c, str(wd)), _tokenizer(source), process_index=0, process_count=1)
    return next(it)


def _logp(path, batch):
    """float64 log-softmax of the model's logits on the batch."""
    cfg, params = rrt_dir.load(path)
    logits = model_lib.from_params(cfg, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    return logp - np.log(np.exp(logp).sum(-1, keepdims=True))


def _tokenizer(path):
    from rrt.formats import tokenizer as tokenizer_lib

    return tokenizer_lib.load_tokenizer(path)


def test_disagreeing_recursion_fields_are_named(dirs, tmp_path):
    _, rec = dirs
    # agreeing (the tiny preset: 2 loops, rank 4) or default fields pass
    cfg, _, _, recursion, _, teacher = train.build_model(_config(rec), str(tmp_path / "ok"))
    assert (cfg.n_loops, cfg.rank_attn, recursion, teacher) == (2, 4, None, None)
    with pytest.raises(ValueError) as e:
        train.build_model(_config(rec, **{"recursion.rank_attn": 8, "recursion.init": "average"}), str(tmp_path))
    msg = str(e.value)
    assert "recursion.rank_attn=8" in msg and "rank_attn=4" in msg and "recursion.init='average'" in msg
    assert "recursion.rank_mlp" not in msg and "recursion.loops" not in msg


def test_distillation_needs_an_explicit_teacher(dirs, tmp_path):
    vanilla, rec = dirs
    with pytest.raises(ValueError, match="--config.teacher"):
        train.build_model(_config(rec, **{"loss.kd_weight": 0.5}), str(tmp_path / "a"))
    c = _config(rec, **{"loss.kd_weight": 0.5, "teacher": vanilla})
    cfg, _, _, _, conversion, (t_cfg, t_params) = train.build_model(c, str(tmp_path / "b"))
    assert t_cfg == VANILLA and cfg.n_loops == 2 and conversion["teacher"] == os.path.abspath(vanilla)
    want = rrt_dir.load(vanilla)[1]
    assert sorted(t_params) == sorted(want) and all(np.array_equal(t_params[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="kd_weight is 0"):
        train.build_model(_config(rec, teacher=vanilla), str(tmp_path / "c"))
