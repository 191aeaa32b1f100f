"""The families beyond the paper's three: Llama 3.x RoPE scaling, Qwen2 / Qwen2.5, Qwen3, OLMo 2, against
transformers (float32 logits, random weights drawn by `hf_parity_test.randomize`).

* Parity: each family (tied and untied heads as they ship) loads and equals transformers' logits.
* Llama 3 checkpoints holding both a default `rope_parameters` and a `llama3` `rope_scaling` read as transformers
  reads them (the scaling wins).
* A field that would change the function and is not implemented is an error naming it, one per family.
* Export: a converted relaxed recursive model of each family, exported, loads in AutoModelForCausalLM and matches.
(Full-rank relaxed = original for qwen3 and olmo2: `recursive_test.test_full_rank_relaxed_equals_original`.)
"""

import json

import export_test
import hf_parity_test
import pytest
import torch
import transformers
from hf_parity_test import VOCAB, compare, randomize

from rrt import export, formats
from rrt.formats import hf

SHAPES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 5000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # wavelengths of head_dim 16 fall in all three bands
}


def llama3(rope=LLAMA3, layers=3, tie=True):
    cfg = transformers.LlamaConfig(**SHAPES, num_hidden_layers=layers, head_dim=16, tie_word_embeddings=tie)
    cfg.rope_parameters = dict(rope)
    return randomize(transformers.LlamaForCausalLM(cfg), norm_center=1.0)


def qwen2(layers=3, tie=True):
    cfg = transformers.Qwen2Config(**SHAPES, num_hidden_layers=layers, rope_theta=5000.0, tie_word_embeddings=tie)
    return randomize(transformers.Qwen2ForCausalLM(cfg), norm_center=1.0)


def qwen3(layers=3, tie=False):
    cfg = transformers.Qwen3Config(**SHAPES, num_hidden_layers=layers, head_dim=24, tie_word_embeddings=tie)
    return randomize(transformers.Qwen3ForCausalLM(cfg), norm_center=1.0)


def olmo2(layers=3, bias=False):
    cfg = transformers.Olmo2Config(**SHAPES, num_hidden_layers=layers, attention_bias=bias, rope_theta=5000.0)
    return randomize(transformers.Olmo2ForCausalLM(cfg), norm_center=1.0)


# Windows shorter than the parity test's 256-token rows, so that they matter; eager attention (the reference
# implementation of soft-capping in transformers).
WINDOW = 48


def mistral(layers=3, tie=False):
    cfg = transformers.MistralConfig(
        **SHAPES,
        num_hidden_layers=layers,
        head_dim=16,
        sliding_window=WINDOW,
        rope_theta=5000.0,
        tie_word_embeddings=tie,
    )
    return randomize(transformers.MistralForCausalLM(cfg), norm_center=1.0)


def gemma2(layers=3, tie=True):
    cfg = transformers.Gemma2Config(
        **SHAPES,
        num_hidden_layers=layers,
        head_dim=16,
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,  # not head_dim: the scale is its own
        attn_logit_softcapping=5.0,  # small caps, which bite at this weight scale
        final_logit_softcapping=3.0,
        rope_theta=5000.0,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return randomize(transformers.Gemma2ForCausalLM(cfg), norm_center=0.0)


GEMMA3_ROPE = {  # bases far apart, so that a layer rotated with the other one shows
    "full_attention": {"rope_type": "default", "rope_theta": 100000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
}


def gemma3(layers=7, tie=True):
    cfg = transformers.Gemma3TextConfig(
        **SHAPES,
        num_hidden_layers=layers,  # 7: five local layers, a global one, a local one (sliding_window_pattern 6)
        head_dim=16,
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        rope_parameters=GEMMA3_ROPE,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return randomize(transformers.Gemma3ForCausalLM(cfg), norm_center=0.0)


@pytest.mark.parametrize(
    "make",
    [
        llama3,
        lambda: llama3({"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.5}, tie=False),
        qwen2,
        lambda: qwen2(tie=False),
        qwen3,
        lambda: qwen3(tie=True),
        olmo2,
        lambda: olmo2(bias=True),
        mistral,
        gemma2,
        gemma3,
    ],
    ids=[
        "llama3",
        "llama-linear",
        "qwen2-tied",
        "qwen2",
        "qwen3",
        "qwen3-tied",
        "olmo2",
        "olmo2-bias",
        "mistral",
        "gemma2",
        "gemma3",
    ],
)
def test_parity(make, tmp_path):
    hf_model = make()
    hf_model.save_pretrained(tmp_path)
    err = compare(hf_model, tmp_path)
    print(f"relative error {err:.2e}")
    assert err < 1e-5


def test_gemma_fields_are_read(tmp_path):
    """What the Gemma 2/3 and Mistral parity tests rely on is read as such (the switches are on, not defaulted)."""
    m2, m3, mi = (hf.config_from_hf(config_of(make)) for make in (gemma2, gemma3, mistral))
    assert (m2.attn_soft_cap, m2.final_soft_cap, m2.query_scalar, m2.sliding_window) == (5.0, 3.0, 24.0, WINDOW)
    assert m2.norm_position == m3.norm_position == "sandwich" and m2.norm_offset == m3.norm_offset == 1.0
    assert m3.qk_norm == "head" and (m3.rope_theta, m3.rope_local_theta) == (100000.0, 500.0)
    assert hf.config_from_hf(config_of(lambda layers: gemma3(layers=7))).local_positions().tolist() == [
        True,
        True,
        True,
        True,
        True,
        False,
        True,
    ]
    assert mi.sliding_window == WINDOW and mi.local_positions().all() and not mi.mixed_attention


def test_llama3_scaling_in_rope_scaling_beside_default_rope_parameters(tmp_path):
    """Converted Llama 3 checkpoints may hold a default `rope_parameters` and the real `rope_scaling`."""
    llama3().save_pretrained(tmp_path)
    config = hf.read_config(tmp_path)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    config["rope_scaling"] = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    config["rope_theta"] = 5000.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert theirs.config.rope_parameters["rope_type"] == "llama3"
    assert formats.load(str(tmp_path))[0].rope_scaling == "llama3"
    err = compare(theirs, tmp_path)
    print(f"relative error {err:.2e}")
    assert err < 1e-5


def config_of(make) -> dict:
    return make(layers=1).config.to_dict()


@pytest.mark.parametrize(
    "make, change, named",
    [
        (llama3, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        (llama3, {"rope_parameters": {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}}, "low_freq_factor"),
        (qwen2, {"use_sliding_window": True}, "use_sliding_window"),
        (qwen3, {"layer_types": ["sliding_attention"]}, "layer_types"),
        (olmo2, {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        (olmo2, {"architectures": ["Olmo2ForSequenceClassification"]}, "Olmo2ForSequenceClassification"),
        # MistralForCausalLM ignores layer_types (Ministral's alternation): refused rather than half-read.
        (mistral, {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        (gemma2, {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        (
            gemma3,
            {"rope_parameters": {**GEMMA3_ROPE, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
            "sliding_attention",
        ),
    ],
    ids=[
        "llama-yarn",
        "llama3-missing-field",
        "qwen2-sliding",
        "qwen3-layer-types",
        "olmo2-dynamic",
        "olmo2-arch",
        "mistral-layer-types",
        "gemma2-bidirectional",
        "gemma3-local-rope-type",
    ],
)
def test_unimplemented_fields_are_named_errors(make, change, named):
    with pytest.raises(ValueError, match=named):
        hf.config_from_hf({**config_of(make), **change})


@pytest.mark.parametrize(
    "make",
    [
        lambda: llama3(layers=4, tie=False),
        lambda: qwen2(layers=4),
        lambda: qwen3(layers=4),
        lambda: olmo2(layers=4, bias=True),
        # 8 layers as 4 x 2 (cycle): shared layer 1 runs at local position 1 and at global position 5.
        lambda: gemma3(layers=8),
        pytest.param(lambda: gemma2(layers=4), marks=pytest.mark.slow),  # default run under 20 min
        pytest.param(lambda: mistral(layers=4), marks=pytest.mark.slow),
    ],
    ids=["llama3", "qwen2", "qwen3", "olmo2", "gemma3", "gemma2", "mistral"],
)
def test_export_of_a_relaxed_recursive_model(make, tmp_path):
    hf_model = make()
    source = export_test.relaxed_recursive(hf_model, export_test.small_tokenizer(False), tmp_path)
    out = str(tmp_path / "export")
    export.export(source, out)
    config = hf.read_config(out)
    assert config["model_type"] == hf_model.config.model_type
    assert config["num_hidden_layers"] == hf_model.config.num_hidden_layers
    ids = hf_parity_test.tokens()[:2, :64]
    err = hf_parity_test.rel_error(export_test.hf_logits(out, ids), export_test.rrt_logits(source, ids))
    print(f"relative error {err:.2e}")
    assert err < 1e-5


# Decoding: the cache path, the deep-KV projection and depth-wise batching (per-row qk-norm weights) with the new
# switches, on decode_test's tiny random recursive models.
# Gemma 3's: local and global positions alternate within a shared layer's loops (cycle, K = 2: shared layer 0 is
# local at positions 0 and 4, global at 2), a window shorter than the prompts plus their continuations, a local RoPE
# base, and Gemma 2's soft cap and query scale; depth-wise batching then holds rows of both kinds at one step.
GEMMA3_SWITCHES = dict(
    qk_norm="head",
    norm_position="sandwich",
    norm_offset=1.0,
    layer_types=("sliding_attention", "sliding_attention", "full_attention") * 2,
    sliding_window=4,
    rope_local_theta=500.0,
    attn_soft_cap=5.0,
    query_scalar=12.0,
)
SWITCHES = {
    "qwen3": dict(qk_norm="head"),
    "olmo2": dict(qk_norm="proj", norm_position="post"),
    "gemma3": GEMMA3_SWITCHES,
}


@pytest.mark.parametrize(
    "switches",
    [
        pytest.param(SWITCHES["qwen3"], marks=pytest.mark.slow),
        pytest.param(SWITCHES["olmo2"], marks=pytest.mark.slow),
        SWITCHES["gemma3"],
    ],
    ids=list(SWITCHES),  # default run under 20 min
)
def test_decoding_with_the_new_switches(switches):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from decode_test import NEW, forward, prompts, tiny
    from depthwise_test import BUDGETS, LENGTHS, MAX_LEN, alone

    from rrt import model as model_lib
    from rrt.decode import cache as decode
    from rrt.decode import depthwise, early_exit

    m = tiny("cycle", 4, seed=2, **switches)
    assert m.cfg.mixed_attention == ("layer_types" in switches)
    assert m.cfg.norm_names()[-2:] == ["q_norm", "k_norm"] and "relax/q_norm" in model_lib.flat_params(m)
    ps = prompts()
    out = decode.generate(m, ps, NEW, return_logits=True)
    seqs, _ = decode.padded_prompts([p + t[:-1] for p, t in zip(ps, out.tokens)], len(ps))
    full_BxTxV, _ = forward(m, seqs)
    for p, logits, full in zip(ps, out.logits, full_BxTxV):
        assert hf_parity_test.rel_error(logits, full[len(p) - 1 : len(p) - 1 + NEW]) < 1e-5

    cfg, w, l = m.cfg, m.weights(), 4
    wl = {
        **model_lib.shared_layer(w["layers"], cfg.layer_ids().reshape(-1)[l]),
        **{n: v[l] for n, v in w["relax"].items()},
    }
    x, pos = jax.random.normal(jax.random.key(0), (2, 1, cfg.d_model)), jnp.array([[3], [7]])
    cache = {n: jnp.zeros((2, 16, cfg.n_kv_heads, cfg.head_dim)) for n in ("k", "v")}
    _, written = model_lib.block(cfg, wl, x, pos, None, cache)
    k, v = early_exit.kv_projection(cfg, wl, x, pos)
    np.testing.assert_allclose(written["k"][jnp.arange(2), pos[:, 0]], k[:, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(written["v"][jnp.arange(2), pos[:, 0]], v[:, 0], rtol=1e-6, atol=1e-6)

    ps = prompts(3, LENGTHS)
    rule = early_exit.ExitRule("max_prob", 0.5)
    got = depthwise.generate(m, ps, BUDGETS, slots=2, rule=rule, max_len=MAX_LEN, n_steps=2)
    assert got.tokens == alone(m, ps, rule).tokens
