"""Training on fake CPU devices: 8 devices as (data, fsdp, tensor) = (8,1,1), (1,8,1), (2,2,2) train like 1 device;
the tiny config really is sharded; gather_shared gathers the shared block once per step (counted in the HLO).

Device counts are per process, fixed before JAX starts, so everything with 8 devices runs in a subprocess and this
file's own process keeps the 1 device the other tests use.
"""

import json
import os
import subprocess
import sys

import pytest
import trainrun

from rrt import config

SHARDING_PROBE = """
import json, jax
from flax import nnx
from rrt import config as config_lib
from rrt import model as model_lib, optim, sharding, train
c = config_lib.preset("tiny")
cfg, _ = train.model_config(c, None)
params = nnx.to_pure_dict(nnx.split(model_lib.abstract(cfg))[1])
opt, _ = optim.make(optim.OptimConfig(total_steps=10, warmup_steps=1), params)
abstract_opt = jax.eval_shape(opt.init, params)
out = {}
for mesh_shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
    mesh = sharding.make_mesh(mesh_shape)
    psh = sharding.param_shardings(params, mesh)
    osh = sharding.opt_state_shardings(opt, abstract_opt, psh, mesh)
    spec = lambda s: [list(a) if isinstance(a, tuple) else a for a in s.spec]
    out[str(mesh_shape)] = {
        "params": {jax.tree_util.keystr(p): spec(s) for p, s in jax.tree_util.tree_leaves_with_path(psh)},
        "opt": {jax.tree_util.keystr(p): spec(s) for p, s in jax.tree_util.tree_leaves_with_path(osh)},
        "devices": sorted({len(s.device_set) for s in jax.tree.leaves(osh)}),
    }
print(json.dumps(out))
"""


def test_tiny_config_is_really_sharded():
    """The tiny config's dims divide the meshes: big weights and their Adam moments are split, not replicated."""
    out = subprocess.run(
        [sys.executable, "-c", SHARDING_PROBE], env=trainrun.env(8), cwd=trainrun.REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    specs = json.loads(out.stdout.strip().splitlines()[-1])
    fsdp, both = specs["(1, 8, 1)"]["params"], specs["(2, 2, 2)"]["params"]
    assert fsdp["['embed']"] == [None, "fsdp"] and both["['embed']"] == ["tensor", "fsdp"]
    for w in ("q", "k", "v", "gate", "up"):  # [K, D, out]: D over fsdp, heads / MLP width over tensor
        assert fsdp[f"['layers']['{w}']"] == [None, "fsdp", None], w
        assert both[f"['layers']['{w}']"] == [None, "fsdp", "tensor"], w
    for w in ("o", "down"):  # [K, in, D]
        assert fsdp[f"['layers']['{w}']"] == [None, None, "fsdp"], w
        assert both[f"['layers']['{w}']"] == [None, "tensor", "fsdp"], w
    assert both["['relax']['q_a']"] == [None, "fsdp", None]  # LoRA: rank replicated
    assert both["['layers']['attn_norm']"] == [None, None]
    # Pure data parallel replicates everything.
    assert all(s == [None] * len(s) for s in specs["(8, 1, 1)"]["params"].values())
    # Adam moments follow their parameters; every leaf of the state lives on all 8 devices.
    for mesh in ("(1, 8, 1)", "(2, 2, 2)"):
        mu = {k: v for k, v in specs[mesh]["opt"].items() if ".mu['layers']['q']" in k}
        assert list(mu.values()) == [specs[mesh]["params"]["['layers']['q']"]], mu
        assert specs[mesh]["devices"] == [8]


@pytest.mark.slow
def test_gather_shared_gathers_the_shared_block_once():
    """tests/allgather_count.py on the (1, 8, 1) mesh: executed all-gathers of the shared weights drop from one per
    depth position and pass (2 * L * 7 projections) to one per step (7), and nothing else changes."""
    out = subprocess.run(
        [sys.executable, os.path.join(trainrun.REPO, "tests", "allgather_count.py"), "--mesh=1,8,1"],
        env=trainrun.env(1),
        cwd=trainrun.REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    off, on = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert (off["gather_shared"], on["gather_shared"]) == (False, True)

    def shared(result):  # gathers of one layer's [I, O] weight (per position) or of the whole [K, I, O] stack
        io = {(64, 64), (64, 32), (64, 128), (128, 64)}
        dims = lambda s: tuple(int(d) for d in s[s.index("[") + 1 : -1].split(","))  # noqa: E731
        return sum(n for s, n in result["all-gather"]["by_shape"].items() if dims(s)[-2:] in io and len(dims(s)) < 4)

    L, projections = 4, 7
    assert shared(off) == 2 * L * projections, off
    assert shared(on) == projections, on
    assert on["all-gather"]["ops"] == off["all-gather"]["ops"] - 2 * L * projections + projections
    assert on["all-gather"]["bytes"] < off["all-gather"]["bytes"]
    # No activation is ever gathered (the [B, T, D] hidden state stays batch-sharded).
    assert not any(s.startswith("f32[8,") for s in {**off["all-gather"]["by_shape"], **on["all-gather"]["by_shape"]})


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["8,1,1", "1,8,1", "2,2,2"])
def test_eight_devices_train_like_one(tmp_path_factory, mesh):
    """5 steps on 8 fake devices give the losses (every loop's) and gradient norms of 1 device, relative 1e-5; the
    checkpoint records that the run's parameters and optimizer state were really sharded."""
    reference = tmp_path_factory.getbasetemp() / "one_device"
    if not (reference / "metrics.jsonl").exists():
        trainrun.run(reference, "--config.mesh=1,1,1", devices=1)
    workdir = tmp_path_factory.mktemp("mesh")
    trainrun.run(workdir, f"--config.mesh={mesh}", devices=8)
    trainrun.assert_same_losses(trainrun.metrics(workdir), trainrun.metrics(reference))
    params, opt = trainrun.saved_specs(workdir, 5), trainrun.saved_specs(workdir, 5, "opt_state")
    want = {"8,1,1": [None, None, None], "1,8,1": [None, "fsdp", None], "2,2,2": [None, "fsdp", "tensor"]}[mesh]
    assert params["layers.q"] == want
    assert {tuple(v) for k, v in opt.items() if k.endswith("layers.q")} == {tuple(want)}


def test_record_config_rewrites_on_each_start_and_keeps_a_different_earlier_one(tmp_path):
    from rrt import train

    workdir = str(tmp_path)
    path = os.path.join(workdir, train.TRAIN_CONFIG)
    assert train.record_config(workdir, '{"attempt": 1}') is None
    assert train.record_config(workdir, '{"attempt": 1}') is None  # the same config: nothing to keep
    assert sorted(os.listdir(workdir)) == [train.TRAIN_CONFIG]
    kept = train.record_config(workdir, '{"attempt": 2}')  # the rerun that proceeds with other data
    with open(path) as f:
        assert f.read() == '{"attempt": 2}'
    with open(kept) as f:
        assert f.read() == '{"attempt": 1}'
    assert os.path.basename(kept).startswith("train_config.") and kept != path
    kept3 = train.record_config(workdir, '{"attempt": 3}')  # same second: a distinct name, nothing overwritten
    assert kept3 != kept
    contents = set()
    for n in os.listdir(workdir):
        with open(os.path.join(workdir, n)) as f:
            contents.add(f.read())
    assert contents == {'{"attempt": 1}', '{"attempt": 2}', '{"attempt": 3}'}


# default run under 20 min on CI; PositionWarning itself is checked by evaluate_test's past-the-context test
@pytest.mark.slow
def test_seq_len_past_the_sources_positions_warns(tmp_path):
    """Training from an HF source that declares 16 positions with data.seq_len = 32: a PositionWarning naming both
    (RoPE: a warning, training proceeds)."""
    import torch
    import transformers
    from hf_parity_test import randomize

    from rrt.formats import gguf, tokenizer

    tok = tokenizer.load_tokenizer(gguf.smollm2_gguf_path())
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    with torch.no_grad():
        m = randomize(transformers.LlamaForCausalLM(cfg), norm_center=1.0)
    source = tmp_path / "hf"
    m.save_pretrained(source)
    tok.save(str(source))
    workdir = tmp_path / "run"
    trainrun.run(workdir, f"--config.source={source}", steps=2)
    log = trainrun.tail(f"{workdir}.log", 100_000)
    assert "PositionWarning: data.seq_len = 32 positions exceeds the 16 that" in log, log[-3000:]
    # the tiny preset is relaxed (rank 4): converted with the default asvd init, calibrated on its training data
    conversion = json.loads((workdir / "rrt_model.json").read_text())["conversion"]
    assert conversion["recursion"]["lora_init"] == "asvd" and "calibrated the asvd LoRA init" in log
    calib = conversion["calibration"]
    assert calib["seq_len"] == 32 and calib["tokens"] >= 16384 and len(calib["sha256"]) == 64
    assert [s["glob"] for s in calib["sources"]] == [s["glob"] for s in config.preset("tiny").data.sources]


MOMENTS_PROBE = """
import numpy as np
from flax import nnx
from rrt import calibrate, sharding
from rrt import model as model_lib
cfg = model_lib.ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=32)
params = {k: np.asarray(v) for k, v in model_lib.flat_params(model_lib.Decoder(cfg, rngs=nnx.Rngs(0))).items()}
rng = np.random.default_rng(0)
seg = np.repeat(np.arange(1, 3), 6)[None].repeat(8, 0).astype(np.int32)
pos = np.concatenate([np.arange(6), np.arange(6)])[None].repeat(8, 0).astype(np.int32)
rows = calibrate.Calibration(rng.integers(0, 64, (8, 12)).astype(np.int32), seg, pos, {})
one = calibrate.collect_moments(cfg, params, rows, batch_size=4, progress=False)
mesh = sharding.make_mesh((2, 2, 1))
four = calibrate.collect_moments(cfg, params, rows, batch_size=4, mesh=mesh, progress=False)
print(max(float(np.abs(one[t] - four[t]).max() / np.abs(one[t]).max()) for t in one))
"""


def test_calibration_moments_on_a_mesh_equal_one_device():
    """asvd calibration sharded over a (2, 2, 1) mesh of 4 fake devices: the same moments as on one device."""
    out = subprocess.run(
        [sys.executable, "-c", MOMENTS_PROBE], env=trainrun.env(4), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-6
