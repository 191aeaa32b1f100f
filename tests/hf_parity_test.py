"""rrt's decoder, loaded from Hugging Face checkpoints, against transformers' PyTorch models (float32 logits).

Weights are redrawn at a scale where attention is peaked and norms are far from their init, so a wrong rotary
layout, head split, norm offset or residual order shows up as a large error rather than hiding in near-uniform
logits."""

import json
import math
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from rrt import formats, model

VOCAB, BATCH, TIME = 512, 3, 256


def randomize(m: torch.nn.Module, norm_center: float, seed: int = 0) -> torch.nn.Module:
    """Draws every parameter afresh: kernels ~ 1.5 / sqrt(fan_in), biases and norm deviations ~ 0.3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_((norm_center if name.endswith("weight") else 0.0) + 0.3 * noise)
            elif p.ndim == 2 and "embed" in name:
                p.copy_(noise)
            elif p.ndim == 2:
                p.copy_(1.5 * noise / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.3 * noise)
    return m.eval()


def tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (BATCH, TIME))


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def compare(hf_model, path, dtype=None) -> float:
    """Relative Frobenius error of rrt's logits against the torch model's (float32)."""
    cfg, params = formats.load(str(path), dtype)
    ours = model.from_params(cfg, params)
    ids = tokens()
    with torch.no_grad():
        ref = hf_model.float()(torch.tensor(ids)).logits.numpy()
    return rel_error(ours(jnp.asarray(ids)), ref)


def llama(tie: bool, **extra):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=72,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=tie,
        **extra,
    )
    return randomize(transformers.LlamaForCausalLM(cfg), norm_center=1.0)


def gemma():
    cfg = transformers.GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,  # larger than hidden_size / heads = 16
    )
    return randomize(transformers.GemmaForCausalLM(cfg), norm_center=0.0)


def neox(parallel: bool, bias: bool = True):
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=parallel,
        attention_bias=bias,
    )
    return randomize(transformers.GPTNeoXForCausalLM(cfg), norm_center=1.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: llama(tie=True),
        lambda: llama(tie=False, attention_bias=True, mlp_bias=True, head_dim=16),
        gemma,
        lambda: neox(parallel=True),
        lambda: neox(parallel=False),
        lambda: neox(parallel=False, bias=False),
    ],
    ids=[
        "llama-tied",
        "llama-untied-bias-headdim",
        "gemma-mqa",
        "neox-parallel",
        "neox-sequential",
        "neox-no-attn-bias",
    ],
)
def test_parity(make, tmp_path):
    hf_model = make()
    hf_model.save_pretrained(tmp_path)
    err = compare(hf_model, tmp_path)
    print(f"relative error {err:.2e}")
    assert err < 1e-5


def test_sharded(tmp_path):
    hf_model = llama(tie=False)
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    err = compare(hf_model, tmp_path)
    print(f"relative error {err:.2e}")
    assert err < 1e-5


def test_bf16_kept_and_cast(tmp_path):
    llama(tie=False).to(torch.bfloat16).save_pretrained(tmp_path)
    _, params = formats.load(str(tmp_path))
    assert {v.dtype for v in params.values()} == {np.dtype(ml_dtypes.bfloat16)}
    # The same bf16 values, both computed in float32 (a fresh load keeps transformers' rotary buffers float32).
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    err = compare(hf_model, tmp_path)
    print(f"relative error {err:.2e}")
    assert err < 1e-5

    _, as_f32 = formats.load(str(tmp_path), dtype=np.float32)
    assert all(as_f32[k].dtype == np.float32 and np.array_equal(as_f32[k], params[k]) for k in params)


# Errors: each names the thing that is wrong.


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(path)
    return path


def rewrite(src, dst, change) -> str:
    """Copies a checkpoint dir with its tensors edited by `change(dict) -> dict`; returns the weights file."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    file = os.path.join(dst, "model.safetensors")
    safetensors.numpy.save_file(change(safetensors.numpy.load_file(file)), file)
    return file


def test_error_unknown_architecture(tiny_dir, tmp_path):
    rewrite(tiny_dir, tmp_path, lambda t: t)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="phi3"):
        formats.load(str(tmp_path))


def test_error_missing_tensor(tiny_dir, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    rewrite(tiny_dir, tmp_path, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=f"missing tensors.*{name}"):
        formats.load(str(tmp_path))


def test_error_extra_tensor(tiny_dir, tmp_path):
    name = "model.layers.0.self_attn.q_norm.weight"
    file = rewrite(tiny_dir, tmp_path, lambda t: {**t, name: np.ones(16, np.float32)})
    with pytest.raises(ValueError, match=f"{file}.*{name}"):
        formats.load(str(tmp_path))


def test_ignored_buffers(tiny_dir, tmp_path):
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite(tiny_dir, tmp_path, lambda t: {**t, name: np.ones(4, np.float32)})
    formats.load(str(tmp_path))


def test_error_shape_mismatch(tiny_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    file = rewrite(tiny_dir, tmp_path, lambda t: {**t, name: np.ones((8, 16), np.float32)})
    with pytest.raises(ValueError, match=rf"{file}.*{name}.*\(8, 16\).*\(16, 16\)"):
        formats.load(str(tmp_path))


def test_error_truncated_file(tiny_dir, tmp_path):
    file = rewrite(tiny_dir, tmp_path, lambda t: t)
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{file}.*truncated"):
        formats.load(str(tmp_path))


def test_error_missing_config(tiny_dir, tmp_path):
    rewrite(tiny_dir, tmp_path, lambda t: t)
    os.remove(tmp_path / "config.json")
    with pytest.raises(ValueError, match="config.json"):
        formats.load(str(tmp_path))


def test_error_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        formats.load(str(tmp_path / "nowhere"))


def test_streaming_peak_memory(tmp_path):
    """Tensors are copied from a memory map straight into the stacked arrays: peak allocation ~ 1x the model."""
    import tracemalloc

    cfg = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tracemalloc.start()
    _, params = formats.load(str(tmp_path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = sum(v.nbytes for v in params.values())
    assert size > 15e6 and peak < 1.2 * size, (peak, size)


@pytest.mark.parametrize(
    "make", [lambda: llama(tie=False), gemma, lambda: neox(parallel=True)], ids=["llama", "gemma", "neox"]
)
def test_bf16_compute_agrees_with_transformers_in_bf16(make, tmp_path):
    """bfloat16 weights and compute on both sides. bf16 rounding alone moves the logits by e_ref = |torch bf16 -
    torch float32| (relative, same weights). rrt in bf16 must be as close to the float32 truth as torch in bf16 is
    (within 1.5 e_ref), and within 2 e_ref of torch in bf16 (two independent roundings: about sqrt(2) e_ref).
    Measured: e_ref 2.6e-2 / 4.9e-3 / 6.0e-3 (llama / gemma / neox); rrt vs truth 1.22 / 1.02 / 1.09 e_ref."""
    hf_model = make().to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path)
    ids = tokens()
    with torch.no_grad():
        ref_bf16 = hf_model(torch.tensor(ids)).logits.float().numpy()
        truth = hf_model.float()(torch.tensor(ids)).logits.numpy()
    ours = formats.load_model(str(tmp_path), compute_dtype="bfloat16")
    assert ours.cfg.dtype == "bfloat16" and ours.embed[...].dtype == jnp.bfloat16
    got = np.asarray(ours(jnp.asarray(ids)), np.float32)
    e_ref = rel_error(ref_bf16, truth)
    e_pair, e_truth = rel_error(got, ref_bf16), rel_error(got, truth)
    print(f"bf16 vs f32 (torch) {e_ref:.2e}; rrt bf16 vs torch bf16 {e_pair:.2e}; rrt bf16 vs f32 {e_truth:.2e}")
    assert 1e-4 < e_ref < 5e-2, "the bf16 runs must actually differ from float32"
    assert e_truth < 1.5 * e_ref and e_pair < 2 * e_ref
