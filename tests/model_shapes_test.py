"""Full-size source models, built with jax.eval_shape (no memory) from their published config.json through the HF
config mapping, have their published parameter counts."""

import pytest
import torch
import transformers

from rrt import archs, model
from rrt.formats import hf

# The published config.json files (the fields that matter), as on the Hugging Face hub.
GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"],
    "model_type": "gemma",
    "vocab_size": 256000,
    "hidden_size": 2048,
    "intermediate_size": 16384,
    "num_hidden_layers": 18,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_act": "gelu",
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}
TINYLLAMA_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
    "torch_dtype": "float32",
}
PYTHIA_1B = {
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 8,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
    "torch_dtype": "float16",
}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
}
# name: (config.json, published parameter count). Counts by hand, e.g. Pythia-1B: embed_in + embed_out
# 2 * 50304 * 2048, per layer qkv 2048 * 6144 + 6144, dense 2048^2 + 2048, MLP 2 * 2048 * 8192 + 8192 + 2048,
# 4 LayerNorm vectors of 2048; 16 layers; final LayerNorm 2 * 2048: 1,011,781,632.
MODELS = {
    "gemma-2b": (GEMMA_2B, 2_506_172_416),
    "tinyllama-1.1b": (TINYLLAMA_1B, 1_100_048_384),
    "pythia-1b": (PYTHIA_1B, 1_011_781_632),
    "smollm2-135m": (SMOLLM2_135M, 134_515_008),
    # The other families (rrt/archs.py); e.g. Qwen3-0.6B: embed 151936 * 1024, per layer q 1024 * 2048, k and v
    # 1024 * 1024, o 2048 * 1024, MLP 3 * 1024 * 3072, norms 2 * 1024 + q/k-norm 2 * 128; 28 layers; final norm
    # 1024: 596,049,920 (tied head).
    "llama-3.2-1b": (archs.LLAMA_3_2_1B, archs.PUBLISHED_PARAMS["llama_3_2_1b"]),
    "qwen2.5-0.5b": (archs.QWEN2_5_0_5B, archs.PUBLISHED_PARAMS["qwen2_5_0_5b"]),
    "qwen3-0.6b": (archs.QWEN3_0_6B, archs.PUBLISHED_PARAMS["qwen3_0_6b"]),
    # Gemma-2-2B: embed 256000 * 2304, per layer q and o 2304 * 2048, k and v 2304 * 1024, MLP 3 * 2304 * 9216, four
    # norms 4 * 2304; 26 layers; final norm 2304: 2,614,341,888. Gemma-3-1B: embed 262144 * 1152, per layer q and o
    # 1152 * 1024, k and v 1152 * 256, MLP 3 * 1152 * 6912, norms 4 * 1152 + q/k-norm 2 * 256; 26 layers; final norm
    # 1152: 999,885,952.
    "gemma-2-2b": (archs.GEMMA_2_2B, archs.PUBLISHED_PARAMS["gemma_2_2b"]),
    "gemma-3-1b": (archs.GEMMA_3_1B, archs.PUBLISHED_PARAMS["gemma_3_1b"]),
}


@pytest.mark.parametrize("name", MODELS)
def test_published_param_counts(name):
    config, published = MODELS[name]
    cfg = hf.config_from_hf(config)
    abstract = model.abstract(cfg)  # jax.eval_shape: no memory
    assert abstract.embed.shape == (cfg.vocab_size, cfg.d_model)
    assert model.count_params(cfg)["total"] == published


def test_family_switches():
    gemma, llama, neox = (hf.config_from_hf(c) for c in (GEMMA_2B, TINYLLAMA_1B, PYTHIA_1B))
    assert (gemma.act, gemma.norm_offset, gemma.embed_scale, gemma.tie_embeddings) == ("gelu_tanh", 1.0, True, True)
    assert (gemma.n_kv_heads, gemma.head_dim, gemma.norm_eps) == (1, 256, 1e-6)
    assert (llama.act, llama.n_kv_heads, llama.head_dim, llama.tie_embeddings) == ("silu", 4, 64, False)
    assert (neox.norm, neox.act, neox.gated_mlp, neox.parallel_residual) == ("layer", "gelu", False, True)
    assert (neox.attn_bias, neox.o_bias, neox.mlp_bias, neox.tie_embeddings) == (True, True, True, False)
    assert (neox.rotary_pct, neox.rotary_dim, neox.rope_theta) == (0.25, 64, 10000.0)
    llama3, qwen2, qwen3 = (hf.config_from_hf(c) for c in (archs.LLAMA_3_2_1B, archs.QWEN2_5_0_5B, archs.QWEN3_0_6B))
    assert (llama3.rope_scaling, llama3.rope_factor, llama3.rope_original_positions) == ("llama3", 32.0, 8192)
    assert (llama3.rope_theta, llama3.tie_embeddings) == (500000.0, True)
    assert (qwen2.attn_bias, qwen2.o_bias, qwen2.head_dim, qwen2.qk_norm) == (True, False, 64, "none")
    assert (qwen3.attn_bias, qwen3.qk_norm, qwen3.head_dim, qwen3.norm_dim("q_norm")) == (False, "head", 128, 128)
    gemma2, gemma3 = (hf.config_from_hf(c) for c in (archs.GEMMA_2_2B, archs.GEMMA_3_1B))
    assert (gemma2.attn_soft_cap, gemma2.final_soft_cap, gemma2.query_scalar, gemma2.sliding_window) == (
        50,
        30,
        256,
        4096,
    )
    assert gemma2.local_positions().tolist() == [i % 2 == 0 for i in range(26)] and gemma2.norm_position == "sandwich"
    assert (gemma3.rope_theta, gemma3.rope_local_theta, gemma3.sliding_window, gemma3.qk_norm) == (
        1e6,
        1e4,
        512,
        "head",
    )
    assert gemma3.local_positions().tolist() == [i % 6 != 5 for i in range(26)] and not gemma3.attn_soft_cap


@pytest.mark.parametrize("name", MODELS)
def test_transformers5_config_json_maps_the_same(name):
    """transformers 5 writes rope settings under `rope_parameters`; older files at the top level."""
    config = MODELS[name][0]
    written = transformers.AutoConfig.for_model(**config).to_dict()
    assert "rope_parameters" in written
    assert hf.config_from_hf(written) == hf.config_from_hf(config)


def test_config_errors():
    with pytest.raises(ValueError, match="mistral"):
        hf.config_from_hf({**TINYLLAMA_1B, "model_type": "mistral"})
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        hf.config_from_hf({**TINYLLAMA_1B, "architectures": ["LlamaForSequenceClassification"]})
    with pytest.raises(ValueError, match="'llama3' needs the field 'low_freq_factor'"):
        hf.config_from_hf({**TINYLLAMA_1B, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="yarn"):
        hf.config_from_hf({**TINYLLAMA_1B, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}})
    with pytest.raises(ValueError, match="relu"):
        hf.config_from_hf({**TINYLLAMA_1B, "hidden_act": "relu"})


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_hidden_layers", "intermediate_size"])
def test_a_config_json_missing_a_required_field_names_file_and_field(tmp_path, field):
    import json

    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in TINYLLAMA_1B.items() if k != field}))
    want = rf"{tmp_path}/config.json: required field '{field}' is missing \(a 'llama' config\)"
    with pytest.raises(ValueError, match=want):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=rf"{tmp_path}/config.json: not valid JSON"):
        hf.load(str(tmp_path))


@pytest.mark.parametrize("name", MODELS)
def test_transformers_agrees_on_counts(name):
    """The same config.json built by transformers on the meta device (no memory) has the same count."""
    config, published = MODELS[name]
    with torch.device("meta"):
        torch_model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    assert sum(p.numel() for p in torch_model.parameters()) == published
