"""GGUF files as llama.cpp writes Llama 3 (`llama` with the `llama-bpe` byte-level BPE and `rope_freqs` scaling),
Llama 2 / Mistral v0.1 (`llama` with a sentencepiece `llama` vocabulary) and Qwen2 (`qwen2`, q/k/v biases, unpermuted,
`qwen2` pre-tokenizer): tiny random-weight transformers models and a small BPE / sentencepiece model trained here are
written with the `gguf` package, then read by rrt and, independently, by transformers (and sentencepiece)."""

import json
import math
import os

import gguf as gguf_lib
import gguf_test
import jax.numpy as jnp
import needs
import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from rrt import formats, model
from rrt.formats import tokenizer

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "corpora")
# The split regexes as Llama 3's / Qwen2's tokenizer.json spell them (written out here, not taken from rrt).
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",
}
SPECIALS = {"llama-bpe": ["<|begin_of_text|>", "<|end_of_text|>"], "qwen2": ["<|endoftext|>", "<|im_start|>"]}
VOCAB = 640
SPM_VOCAB = 400
MIXED = "\nIn 1984, 3 of 12345 cats ate 2.5 fish -- for $7.99! They're   here; don't\n\n\tgo.  "


def corpus(name: str, n: int) -> str:
    path = os.path.join(DATA, name)
    if not os.path.isfile(path):
        needs.missing(f"{path}: missing (../shared/data)")
    with open(path) as f:
        return f.read()[:n]


def train_bpe(pre: str) -> Tokenizer:
    """A byte-level BPE shaped like Llama 3's (ignore_merges) or Qwen2's tokenizer.json, trained on real text."""
    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(SPECIALS[pre]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus("tinyshakespeare.txt", 200_000)], trainer)
    tok.add_special_tokens(SPECIALS[pre])
    return tok


def train_spm(path: str, text: str) -> sentencepiece.SentencePieceProcessor:
    """A sentencepiece BPE with Llama 2's trainer settings (byte fallback, digits split, no normalization, spaces
    kept), trained on real text."""
    with open(path + ".txt", "w") as f:
        f.write(text)
    sentencepiece.SentencePieceTrainer.train(
        input=path + ".txt",
        model_prefix=path,
        vocab_size=SPM_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return sentencepiece.SentencePieceProcessor(model_file=path + ".model")


def add_sentencepiece_vocab(w, sp, flags: bool) -> None:
    """convert_hf_to_gguf.py's _create_vocab_sentencepiece + SpecialVocab for a Llama 2 tokenizer.model; `flags` also
    writes add_bos_token / add_eos_token / add_space_prefix (older files have none of them)."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = gguf_lib.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf_lib.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf_lib.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf_lib.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf_lib.TokenType.BYTE
        types.append(int(kind))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if flags:
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(True)


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(c) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for rope_type llama3."""
    rp = c.rope_parameters
    dim = c.hidden_size // c.num_attention_heads
    freqs = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high, old = (
        rp["factor"],
        rp["low_freq_factor"],
        rp["high_freq_factor"],
        rp["original_max_position_embeddings"],
    )
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_gguf(
    hf_model, tok: Tokenizer | None, pre: str, path: str, arch: str, rope_freqs=None, keys=None, sp=None, flags=True
) -> None:
    """A float32 GGUF of a transformers Llama / Qwen2, tensors named (and, for llama, permuted) as llama.cpp does,
    with the tokenizer in tokenizer.ggml.* as convert_hf_to_gguf.py writes a byte-level BPE `tok` or a sentencepiece
    model `sp`."""
    c = hf_model.config
    w = gguf_lib.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "llama":
        w.add_vocab_size(c.vocab_size)
    for key, value in (keys or {}).items():
        getattr(w, key)(value)
    if tok is not None:
        vocab = tok.get_vocab()
        tokens = sorted(vocab, key=vocab.get)
        special = SPECIALS.get(pre, SPECIALS["qwen2"])
        specials = set(special)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in specials else 1 for t in tokens])
        merges = json.loads(tok.to_str())["model"]["merges"]
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        w.add_bos_token_id(vocab[special[0]])
        w.add_eos_token_id(vocab[special[-1 if pre == "llama-bpe" else 0]])
        w.add_add_bos_token(pre == "llama-bpe")
    if sp is not None:
        add_sentencepiece_vocab(w, sp, flags)
    names = gguf_test.GGUF_NAMES
    for name, p in hf_model.state_dict().items():
        a = p.float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name == "lm_head.weight":
            if not c.tie_word_embeddings:
                w.add_tensor("output.weight", a)
        elif "rotary_emb" not in name:
            i, rest, kind = name.split(".")[2], ".".join(name.split(".")[3:-1]), name.split(".")[-1]
            if arch == "llama" and rest == "self_attn.q_proj":
                a = llama_cpp_permute(a, c.num_attention_heads)
            elif arch == "llama" and rest == "self_attn.k_proj":
                a = llama_cpp_permute(a, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{names[rest]}.{kind}", a)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny(arch: str, vocab: int, tie: bool, rope_scaling: dict | None = None, **overrides):
    kw = (
        dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            tie_word_embeddings=tie,
            max_position_embeddings=512,
        )
        | overrides
    )
    if arch == "llama":
        rp = {"rope_type": "default", "rope_theta": 500000.0} | (rope_scaling or {})
        cfg = transformers.LlamaConfig(**kw, rope_parameters=rp)
        klass = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        klass = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    m = klass(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    return m


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def bpe():
    return {pre: train_bpe(pre) for pre in SPLITS}


CASES = {"llama": ("llama", "llama-bpe", False), "qwen2": ("qwen2", "qwen2", True)}


@pytest.mark.parametrize("case", list(CASES))
def test_family_gguf_matches_transformers(case, bpe, tmp_path):
    """Logits and tokens of rrt's load against transformers loading the same file."""
    arch, pre, tie = CASES[case]
    hf_model = tiny(arch, VOCAB, tie)
    write_gguf(hf_model, bpe[pre], pre, str(tmp_path / "m.gguf"), arch)
    cfg, params = formats.load(str(tmp_path / "m.gguf"))
    assert (cfg.family, cfg.attn_bias, cfg.tie_embeddings, cfg.vocab_size) == (arch, arch == "qwen2", tie, VOCAB)

    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    tok = tokenizer.load_tokenizer(str(tmp_path / "m.gguf"))
    text = corpus("tinystories_val.txt", 6000) + MIXED + corpus("tinyshakespeare.txt", 3000)
    ids = tok.encode(text)
    assert ids == ref_tok.encode(text, add_special_tokens=False) == bpe[pre].encode(text).ids
    assert tok.decode(ids) == text
    bos = bpe[pre].token_to_id(SPECIALS[pre][0])
    assert (tok.bos_id, tok.add_bos) == (bos, pre == "llama-bpe")
    assert ref_tok.encode("a")[: len(ref_tok.encode("a")) - 1] == ([bos] if tok.add_bos else [])
    assert tok.encode(SPECIALS[pre][0] + "hi") == [bos, *tok.encode("hi")]

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    )
    batch = np.asarray([ids[:128], ids[128:256]])
    with torch.no_grad():
        ref = ref_model(torch.tensor(batch)).logits.numpy()
        original = hf_model(torch.tensor(batch)).logits.numpy()
    ours = np.asarray(model.from_params(cfg, params)(jnp.asarray(batch)))
    assert rel_err(ours, ref) < 1e-5 and rel_err(ours, original) < 1e-5


def test_llama3_rope_freqs(tmp_path):
    """llama.cpp's rope_freqs tensor of a Llama 3.x model: rrt maps it back to llama3 scaling and matches the
    original transformers model (transformers' GGUF loader ignores the tensor, so it is not the reference here)."""
    scaling = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)
    # Llama 3.2's head_dim 64, theta 500000 and 8192-token original: wavelengths below, inside and above the band.
    shape = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    hf_model = tiny("llama", 256, True, scaling | {"original_max_position_embeddings": 8192}, **shape)
    factors = llama3_rope_factors(hf_model.config)
    assert (factors == 1).any() and (factors == 32).any() and ((factors > 1) & (factors < 32)).sum() >= 2
    path = str(tmp_path / "l3.gguf")
    write_gguf(hf_model, None, "", path, "llama", rope_freqs=factors, keys={"add_rope_scaling_orig_ctx_len": 8192})
    cfg, params = formats.load(path)
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_positions) == ("llama3", 32.0, 8192)
    assert cfg.rope_low_freq_factor == pytest.approx(1.0) and cfg.rope_high_freq_factor == pytest.approx(4.0)
    ids = np.random.default_rng(0).integers(0, 256, (2, 300))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model.from_params(cfg, params)(jnp.asarray(ids)))
    assert rel_err(ours, ref) < 1e-5


def test_named_errors(bpe, tmp_path):
    hf_model = tiny("llama", VOCAB, True)
    # a per-frequency scaling that is not Llama 3's band-wise scheme
    odd = np.linspace(1, 3, 8).astype(np.float32)
    write_gguf(hf_model, None, "", str(tmp_path / "odd.gguf"), "llama", rope_freqs=odd)
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        formats.load(str(tmp_path / "odd.gguf"))
    # a scaling type llama.cpp has that rrt does not
    write_gguf(
        hf_model,
        None,
        "",
        str(tmp_path / "yarn.gguf"),
        "llama",
        keys={"add_rope_scaling_type": gguf_lib.RopeScalingType.YARN, "add_rope_scaling_factor": 4.0},
    )
    with pytest.raises(ValueError, match="'yarn'"):
        formats.load(str(tmp_path / "yarn.gguf"))
    # an architecture other than llama / qwen2
    write_gguf(hf_model, None, "", str(tmp_path / "arch.gguf"), "falcon")
    with pytest.raises(ValueError, match="architecture 'falcon'"):
        formats.load(str(tmp_path / "arch.gguf"))
    # a pre-tokenizer rrt does not know
    write_gguf(hf_model, bpe["qwen2"], "deepseek-llm", str(tmp_path / "pre.gguf"), "llama")
    with pytest.raises(ValueError, match="pre-tokenizer 'deepseek-llm'"):
        tokenizer.load_tokenizer(str(tmp_path / "pre.gguf"))
    # a tokenizer model other than gpt2 / llama
    write_gguf(hf_model, None, "", str(tmp_path / "t5.gguf"), "llama", keys={"add_tokenizer_model": "t5"})
    with pytest.raises(ValueError, match="tokenizer model 't5'"):
        tokenizer.load_tokenizer(str(tmp_path / "t5.gguf"))


def test_linear_rope_scaling_keys(tmp_path):
    """`llama.rope.scaling.type = linear` with a factor (llama.cpp divides every frequency by it) against the original
    transformers model with rope_type linear."""
    hf_model = tiny("llama", 256, False, {"rope_type": "linear", "factor": 4.0})
    path = str(tmp_path / "lin.gguf")
    keys = {"add_rope_scaling_type": gguf_lib.RopeScalingType.LINEAR, "add_rope_scaling_factor": 4.0}
    write_gguf(hf_model, None, "", path, "llama", keys=keys)
    cfg, params = formats.load(path)
    assert (cfg.rope_scaling, cfg.rope_factor) == ("linear", 4.0)
    ids = np.random.default_rng(1).integers(0, 256, (2, 200))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    assert rel_err(np.asarray(model.from_params(cfg, params)(jnp.asarray(ids))), ref) < 1e-5


# Leading spaces, newlines, digits, characters outside the vocabulary (byte fallback) and a control token in the text.
SPM_SAMPLES = [
    "Once upon a time, there was a little girl named Lily.",
    " A leading space",
    "  Two leading spaces and   a run",
    "\nStarts with a newline,\n\nthen a blank line\tand a tab.",
    "In 1984, 3 of 12345 cats ate 2.5 fish for $7.99!",
    "Café naïve – “quotes” 日本語 ☃ 🙂 Ünïcödé",
    "She said </s> and <s>then",
    "",
]


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return train_spm(str(tmp_path_factory.mktemp("spm") / "sp"), corpus("tinystories_val.txt", 30_000))


@pytest.mark.parametrize("flags", [True, False], ids=["flags", "no-flags"])
def test_llama_sentencepiece_gguf_matches_transformers(flags, spm, tmp_path):
    """A Llama 2-style GGUF (tokenizer.ggml.model = llama): rrt's tokenizer against transformers' (built from the
    same metadata) and the sentencepiece model itself, and logits against transformers loading the file. Without
    the add_bos_token / add_space_prefix keys both default to true, as in llama.cpp and transformers."""
    hf_model = tiny("llama", SPM_VOCAB, False)
    write_gguf(hf_model, None, "", str(tmp_path / "m.gguf"), "llama", sp=spm, flags=flags)
    cfg, params = formats.load(str(tmp_path / "m.gguf"))
    assert (cfg.family, cfg.tie_embeddings, cfg.vocab_size) == ("llama", False, SPM_VOCAB)

    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    tok = tokenizer.load_tokenizer(str(tmp_path / "m.gguf"))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos, tok.vocab_size) == (1, 2, True, False, SPM_VOCAB)
    text = corpus("tinystories_val.txt", 38_000)[30_000:] + MIXED + corpus("tinyshakespeare.txt", 3000)
    for sample in [text, *SPM_SAMPLES]:
        ids = tok.encode(sample)
        assert ids == ref_tok.encode(sample, add_special_tokens=False), sample
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref_tok.decode(ids, skip_special_tokens=skip), sample
        if "<" not in sample:  # sentencepiece reads control tokens in the text as plain characters
            if not sample.startswith(" "):
                assert ids == spm.encode(sample) and tok.decode(ids) == sample, sample
            else:  # the one difference: sentencepiece prepends "▁" to text starting with a space, transformers not
                assert spm.encode(sample) != ids and spm.decode(spm.encode(sample)) == sample, sample
                assert tok.decode(ids) == sample[1:], sample
    assert any(spm.id_to_piece(i).startswith("<0x") for i in tok.encode(SPM_SAMPLES[5]))  # byte fallback used
    assert tok.encode("</s>hi")[0] == 2 and tok.token_to_id("<unk>") == spm.unk_id() == 0
    # BOS through the template processor, as transformers adds it.
    assert tok.backend.encode("Hello").ids == ref_tok.encode("Hello") == [1, *tok.encode("Hello")]
    ids = tok.encode(text)
    # What rrt-export writes for it reads back in transformers as the same tokenizer.
    tokenizer.save_hf(tok, str(tmp_path / "hf"), "llama")
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert exported.encode(text) == [1, *ids] and exported.decode(ids) == tok.decode(ids)

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    )
    batch = np.asarray([ids[:128], ids[128:256]])
    with torch.no_grad():
        ref = ref_model(torch.tensor(batch)).logits.numpy()
        original = hf_model(torch.tensor(batch)).logits.numpy()
    ours = np.asarray(model.from_params(cfg, params)(jnp.asarray(batch)))
    assert rel_err(ours, ref) < 1e-5 and rel_err(ours, original) < 1e-5


def test_llama_sentencepiece_no_space_prefix(spm, tmp_path):
    """add_space_prefix = false (sentencepiece's add_dummy_prefix off): no "▁" is prepended and decode strips none,
    exactly as the sentencepiece model with that option. (transformers' GGUF loader ignores the key, so it is not the
    reference here.)"""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    plain = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    w = gguf_lib.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    add_sentencepiece_vocab(w, spm, flags=False)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    tok = tokenizer.load_tokenizer(str(tmp_path / "t.gguf"))
    text = corpus("tinystories_val.txt", 34_000)[30_000:]
    for sample in [text, *SPM_SAMPLES]:
        if "<" not in sample:
            ids = tok.encode(sample)
            assert ids == plain.encode(sample) and tok.decode(ids) == sample, sample
