"""GGUF reading: a tiny Llama written the way llama.cpp's converter writes it (q/k rows permuted, float32) must give
transformers' logits; the real SmolLM2-135M-Instruct Q4_1 file must match transformers loading the same file."""

import os
import time

import gguf as gguf_lib
import jax.numpy as jnp
import needs
import numpy as np
import pytest
import torch
import transformers

from rrt import formats, model
from rrt.formats import gguf, tokenizer

CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "corpora", "tinystories_val.txt")


# Hugging Face Llama module names -> llama.cpp tensor names (per block), for the GGUF files the tests write.
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v"}
GGUF_NAMES |= {"self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"}
GGUF_NAMES |= {"mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_model, path: str, extra_tensor: str | None = None) -> None:
    """A float32 GGUF of a transformers Llama, tensors named and permuted as llama.cpp does."""
    c = hf_model.config
    w = gguf_lib.GGUFWriter(path, "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    names = GGUF_NAMES
    for name, p in hf_model.state_dict().items():
        a = p.float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name == "lm_head.weight":
            if not c.tie_word_embeddings:
                w.add_tensor("output.weight", a)
        else:
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            if rest == "self_attn.q_proj":
                a = llama_cpp_permute(a, c.num_attention_heads)
            elif rest == "self_attn.k_proj":
                a = llama_cpp_permute(a, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{names[rest]}.weight", a)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.full(4, 2.0, np.float32))  # not a per-frequency scaling rrt implements
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_llama(tie: bool):
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=20000.0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape) if "norm" in name else torch.randn(p.shape) / p.shape[-1] ** 0.5)
    return m


@pytest.mark.parametrize("tie", [True, False])
def test_written_gguf_matches_transformers(tie, tmp_path):
    hf_model = tiny_llama(tie)
    path = str(tmp_path / "tiny.gguf")
    write_gguf(hf_model, path)
    cfg, params = formats.load(path)
    assert cfg.tie_embeddings == tie and ("head" in params) == (not tie)
    ids = np.random.default_rng(0).integers(0, 256, (2, 200))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model.from_params(cfg, params)(jnp.asarray(ids)))
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5


def test_gguf_errors(tmp_path):
    path = str(tmp_path / "extra.gguf")
    write_gguf(tiny_llama(True), path, extra_tensor="rope_freqs.weight")
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        formats.load(path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(ValueError, match="bad.gguf"):
        formats.load(str(bad))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(6 * 8 * 3).reshape(6 * 8, 3)
    np.testing.assert_array_equal(gguf.unpermute(llama_cpp_permute(w, 6), 6), w)


@pytest.fixture(scope="module")
def smollm2():
    try:
        return gguf.smollm2_gguf_path()
    except FileNotFoundError as e:
        needs.missing(str(e))


def test_smollm2_config(smollm2):
    cfg = gguf.config_from_gguf(gguf.reader(smollm2), smollm2)
    assert (cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (30, 576, 1536, 9, 3, 64)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings) == (49152, 100000.0, True)
    assert cfg.norm_eps == pytest.approx(1e-5)  # stored as float32


@pytest.mark.slow  # ~40 s alone; ~2 min on a busy 2-core machine (transformers dequantizes the file too)
def test_smollm2_logits_match_transformers(smollm2):
    with open(CORPUS) as f:
        text = f.read()[:6000]
    ids = tokenizer.load_tokenizer(smollm2).encode(text)[:320]
    ids = np.asarray([ids[:160], ids[160:320]])

    start = time.time()
    cfg, params = formats.load(smollm2)
    logits = np.asarray(model.from_params(cfg, params)(jnp.asarray(ids)))
    ours = time.time() - start

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2), gguf_file=os.path.basename(smollm2), dtype=torch.float32
    )
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    err = np.linalg.norm(logits - ref) / np.linalg.norm(ref)
    print(f"relative error {err:.2e} over {ids.size} tokens (rrt load + forward {ours:.1f}s)")
    assert err < 1e-4
    # The weights themselves are right: the model predicts this text well.
    logp = torch.log_softmax(torch.tensor(logits[:, :-1]), -1).gather(-1, torch.tensor(ids[:, 1:, None]))
    assert float(torch.exp(-logp.mean())) < 20
