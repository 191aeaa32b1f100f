"""rrt.aot: the real train step compiles ahead of time for TPU topologies on this CPU (needs libtpu importable)."""

import importlib.util
import os

import needs
import pytest

from rrt import aot


@pytest.fixture(autouse=True)
def _libtpu():
    """The TPU compiler comes from requirements.txt: a dev checkout without it skips; under .ci/run it fails."""
    if importlib.util.find_spec("libtpu") is None:
        needs.missing("libtpu is not importable (pip install libtpu as pinned in requirements.txt): no TPU compiler")


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _preset(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def test_topology_names():
    assert aot.parse_topology("v5e-256") == ("v5e", "v5e:16x16")
    assert aot.parse_topology("v6e-64") == ("v6e", "v6e:8x8")
    assert aot.parse_topology("v4-64") == ("v4", "v4:2x4x4")
    assert aot.parse_topology("v5p-128") == ("v5p", "v5p:4x4x4")
    assert aot.parse_topology("v5e:2x4") == ("v5e", "v5e:2x4")
    with pytest.raises(ValueError):
        aot.parse_topology("v5e-100")


def test_collectives_parse():
    hlo = (
        "%ag = bf16[4,8]{1,0} all-gather(bf16[1,8]{1,0} %p), dimensions={0}\n"
        "%ars = (f32[16]{0}, f32[16]{0}) all-reduce-start(f32[16]{0} %x)\n"
        "%ard = f32[16]{0} all-reduce-done((f32[16]{0}, f32[16]{0}) %ars)\n"
    )
    c = aot.collectives(hlo)
    assert c["all-gather"] == {"count": 1, "bytes": 64.0}
    assert c["all-reduce"] == {"count": 1, "bytes": 64.0}


NESTED_LOOPS_HLO = """
%inner_cond (p: (s32[], f32[8])) -> pred[] {
  %c3 = s32[]{:T(128)} constant(3)
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c3), direction=LT
}

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[8]{0} all-gather(f32[2]{0} %x), dimensions={0}
  ROOT %t = (s32[], f32[8]) tuple(%i, %ag)
}

%outer_cond (p: (s32[], f32[8])) -> pred[] {
  %c5 = s32[]{:T(128)} constant(5)
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c5), direction=LT
}

%outer_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %w = (s32[], f32[8]) while(%p), condition=%inner_cond, body=%inner_body
  %ar = f32[8]{0} all-reduce(f32[8]{0} %y), to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t0), condition=%outer_cond, body=%outer_body
  %ag2 = f32[8]{0} all-gather(f32[2]{0} %z), dimensions={0}
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""


def test_collectives_per_step_multiply_nested_trip_counts():
    static = aot.collectives(NESTED_LOOPS_HLO)
    assert static["all-gather"]["count"] == 2 and static["all-reduce"]["count"] == 1
    per_step = aot.collectives_per_step(NESTED_LOOPS_HLO)
    assert per_step["all-gather"] == {"count": 1 + 5 * 3, "bytes": 32.0 * (1 + 15)}  # the entry's + 5 x 3 inner
    assert per_step["all-reduce"]["count"] == 5 and per_step["unknown_trip_counts"] == 0


def test_tiny_compiles_for_v5e_2x2():
    c = _preset("tiny")
    r = aot.analyze(c, "v5e:2x2")
    assert r["config"]["chips"] == 4 and r["fits"]
    m = r["per_chip_bytes"]
    assert 0 < m["params"] <= m["arguments"] and m["total"] < m["hbm"]
    assert r["flops"]["xla_per_chip"] > 0 and r["flops"]["rrt_per_step"] > 0
    assert "all-gather" in r["collectives"]  # fsdp over 4 chips gathers the parameters
    per_step = r["collectives_per_step"]
    assert per_step["unknown_trip_counts"] == 0  # every scan's trip count is read from its condition
    assert per_step["all-gather"]["bytes"] >= r["collectives"]["all-gather"]["bytes"]
    assert r["mosaic_kernels"] == 0  # rows of 64 tokens: attention="auto" takes xla (splash needs 128)


# (preset, the slice its docstring names)
PODS = [
    ("recursive_gemma_1b", "v5e-256"),
    ("recursive_gemma_1b_relaxed", "v5e-256"),
    ("recursive_pythia_1b", "v4-64"),
    ("scratch_recursive_1b", "v5e-256"),
    ("recursive_tinyllama_1b", "v5e-256"),  # a GPU preset: the TPU slice its docstring measures it on
    ("recursive_llama32_1b", "v5e-256"),
]


@pytest.mark.slow
@pytest.mark.parametrize("preset,topology", PODS)
def test_pod_presets_fit(preset, topology):
    r = aot.analyze(_preset(preset), topology)
    assert r["fits"], aot.table(r)


def test_tiny_with_splash_attention_compiles_for_v5e_2x2():
    """The Mosaic kernel inside the step's shard_map (rows over fsdp's 4 chips) compiles for the TPU and fits."""
    c = _preset("tiny")
    c.attention = "splash"
    c.data.seq_len = 128  # splash blocks are multiples of 128 tokens
    r = aot.analyze(c, "v5e:2x2")
    assert r["fits"] and r["config"]["chips"] == 4
    assert r["mosaic_kernels"] > 0  # splash's forward and backward kernels
    c.attention = "auto"  # resolves by the mesh's platform (TPU), not this CPU's
    assert aot.analyze(c, "v5e:2x2")["mosaic_kernels"] == r["mosaic_kernels"]
