"""Every config parses, builds its model with jax.eval_shape (no memory), and has the parameter count it claims."""

import ast
import glob
import os

import pytest

from rrt import config as config_lib
from rrt import model as model_lib
from rrt import train
from rrt.formats import hf

CONFIGS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
    if not p.endswith(("__init__.py", "archs.py"))
)


def build(name):
    c = config_lib.preset(name)
    base = hf.config_from_hf(dict(c.arch)) if c.arch else None
    cfg, rec = train.model_config(c, base)
    return c, base, cfg


def test_all_configs_found():
    assert {
        "base",
        "tiny",
        "smollm2_demo",
        "recursive_gemma_1b",
        "recursive_gemma_1b_relaxed",
        "recursive_tinyllama_1b",
        "recursive_pythia_1b",
        "recursive_llama32_1b",
        "scratch_recursive_1b",
    } <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
    c, base, cfg = build(name)
    assert model_lib.abstract(cfg) is not None  # eval_shape: the whole model, no memory
    counts = model_lib.count_params(cfg)
    assert counts["total"] > 0
    assert c.data.global_batch_size % c.grad_accum == 0
    assert c.recursion.loops == cfg.n_loops and cfg.n_layers % cfg.n_loops == 0
    with open(config_lib.preset_path(name)) as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    assert doc and ("python " in doc or "bash " in doc), "docstring needs its command"


def non_embedding(cfg):
    counts = model_lib.count_params(cfg)
    return counts["total"] - counts["embedding"]


def test_recursive_gemma_1b_halves_gemma_2b():
    _, base, cfg = build("recursive_gemma_1b")
    assert (cfg.n_shared, cfg.n_loops, cfg.strategy) == (9, 2, "cycle")
    ratio = non_embedding(cfg) / non_embedding(base)
    assert 0.49 < ratio < 0.51, ratio
    total = model_lib.count_params(cfg)["total"]
    assert 1.45e9 < total < 1.55e9  # "Recursive Gemma 1B": 0.99B non-embedding + 0.52B embedding


def test_relaxed_gemma_adds_rank_512_lora():
    _, base, cfg = build("recursive_gemma_1b_relaxed")
    counts = model_lib.count_params(cfg)
    # rank 512 on q, k, v, o, gate, up, down of 18 positions (k, v: min(d_in, d_out) = 256 caps them)
    d, f, r = 2048, 16384, 512
    per_pos = r * (d + d) * 2 + 256 * (d + 256) * 2 + r * (d + f) * 3
    assert counts["lora"] == 18 * per_pos
    assert cfg.per_position_norms and counts["position_vectors"] == 18 * 2 * d


@pytest.mark.parametrize(
    "name, loops, shared",
    [("recursive_tinyllama_1b", 2, 11), ("recursive_pythia_1b", 2, 8), ("recursive_llama32_1b", 2, 8)],
)
def test_paper_presets_halve_their_sources(name, loops, shared):
    _, base, cfg = build(name)
    assert (cfg.n_loops, cfg.n_shared) == (loops, shared)
    assert abs(non_embedding(cfg) / non_embedding(base) - 0.5) < 0.01


def test_recursive_llama32_1b_is_llama_3_2_as_8_x_2():
    c, base, cfg = build("recursive_llama32_1b")
    assert (base.n_layers, cfg.n_shared, cfg.n_loops, cfg.strategy, c.recursion.init) == (16, 8, 2, "cycle", "stepwise")
    assert (base.rope_scaling, base.rope_factor, base.tie_embeddings) == ("llama3", 32.0, True)
    assert model_lib.count_params(base)["total"] == 1_235_814_400  # meta-llama/Llama-3.2-1B's published count


@pytest.mark.parametrize("name", CONFIGS)
def test_a_placeholder_source_is_refused_by_name(name):
    """Presets that convert a pretrained model leave config.source to the user; training says so before it starts."""
    from absl import app

    c = config_lib.preset(name)
    if c.source is not None:
        train.require_source(c)  # a real source, or "" (scratch): nothing to refuse
        return
    with pytest.raises(app.UsageError, match=r"config\.source is unset.*--config\.source="):
        train.require_source(c)


def test_scratch_1b_size():
    _, _, cfg = build("scratch_recursive_1b")
    assert cfg.n_loops == 2 and cfg.n_shared == 12
    assert 0.5e9 < model_lib.count_params(cfg)["total"] < 0.8e9  # unique parameters of a ~1B-compute model


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--config.optim.learning_rate=1",
            r"--config\.optim\.learning_rate: optim has no field 'learning_rate'; "
            r"did you mean --config\.optim\.lr\? \(optim's fields: .*\blr\b",
        ),
        ("--config.optim.warmup_step=3", r"no field 'warmup_step'; did you mean --config\.optim\.warmup_steps"),
        ("--config.stepz=3", r"the config has no field 'stepz'; did you mean --config\.steps\?"),
        ("--config.data.seqlen=3", r"data has no field 'seqlen'; did you mean --config\.data\.seq_len\?"),
    ],
)
def test_a_misspelled_override_names_the_field_and_the_closest_real_one(override, message):
    with pytest.raises(ValueError, match=message):
        config_lib.check_overrides(["prog", "--config", "tiny", "--workdir", "w", override])


def test_real_overrides_pass_the_check():
    config_lib.check_overrides(["prog", "--config=tiny", "--config.optim.lr=1e-3", "--config.data.seq_len=32"])
