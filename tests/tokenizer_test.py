"""Tokenizers: the GGUF-built SmolLM2 tokenizer against transformers' on real text; save/load round trips;
Hugging Face directories (tokenizer.json, tokenizer.model) and their BOS/EOS flags."""

import json
import os
import pickle

import needs
import pytest
import sentencepiece
import tokenizers
import transformers

from rrt.formats import gguf, tokenizer

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "corpora")


def corpus(name: str, n: int) -> str:
    with open(os.path.join(DATA, name)) as f:
        return f.read()[:n]


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = gguf.smollm2_gguf_path()
    except FileNotFoundError as e:
        needs.missing(str(e))
    return path, tokenizer.load_tokenizer(path)


@pytest.fixture(scope="module")
def reference(smollm2):
    path = smollm2[0]
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.mark.parametrize("name", ["tinystories_val.txt", "tinyshakespeare.txt"])
def test_gguf_matches_transformers(smollm2, reference, name):
    tok = smollm2[1]
    text = corpus(name, 12000) + "\nIn 1984, 3 of 12 cats ate 2.5 fish -- for $7.99!\n"
    ids = tok.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    docs = text.split("\n\n")
    assert (
        tok.encode_batch(docs)
        == [tok.encode(d) for d in docs]
        == reference(docs, add_special_tokens=False)["input_ids"]
    )


def test_smollm2_specials(smollm2):
    tok = smollm2[1]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (49152, 1, 2, False, False)
    assert tok.encode("<|im_start|>user") == [1, tok.encode("user")[0]]
    assert tok.decode([1, 2], skip_special_tokens=True) == ""


def test_smollm_pretokenizer_splits_digits_first(smollm2):
    """llama.cpp's `smollm` (and SmolLM2's tokenizer.json): single digits are split off before the byte-level regex,
    so a whitespace run before a number stays one piece. transformers' GGUF conversion skips the digit split and
    differs here (it splits "  12" as " ", " 1", ...); real corpus text does not hit this case."""
    tok = smollm2[1]
    assert [tok.decode([i]) for i in tok.encode("x  12345")] == ["x", "  ", "1", "2", "3", "4", "5"]


def test_save_load_roundtrip(smollm2, tmp_path):
    tok = smollm2[1]
    tok.save(str(tmp_path / "ckpt" / "tokenizer"))
    (tmp_path / "ckpt" / "rrt_model.json").write_text("{}")
    again = tokenizer.load_tokenizer(str(tmp_path / "ckpt"))  # an rrt checkpoint dir: reads <dir>/tokenizer
    text = corpus("tinyshakespeare.txt", 3000)
    assert again.encode(text) == tok.encode(text)
    assert (again.vocab_size, again.bos_id, again.eos_id, again.add_bos, again.add_eos) == (49152, 1, 2, False, False)
    assert again.fingerprint == tok.fingerprint
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_hf_dir_flags(smollm2, tmp_path):
    """tokenizer_config.json decides the flags; without it, what the post-processor adds decides."""
    backend = tokenizers.Tokenizer.from_str(smollm2[1].backend.to_str())
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = tokenizer.load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (1, 2, True, True)
    assert tok.encode("hi") == smollm2[1].encode("hi")  # encode never adds them

    config = {"add_bos_token": False, "add_eos_token": False, "bos_token": {"content": "<|endoftext|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"eos_token": "<|im_end|>"}))
    tok = tokenizer.load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (0, 2, False, False)


def test_sentencepiece_dir(tmp_path):
    text_file = tmp_path / "train.txt"
    text_file.write_text(corpus("tinyshakespeare.txt", 100_000))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    os.rename(tmp_path / "sp.model", model_dir / "tokenizer.model")
    tok = tokenizer.load_tokenizer(str(model_dir))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (400, 1, 2, True, False)
    text = " ".join(corpus("tinyshakespeare.txt", 2000).split())  # sentencepiece's nmt_nfkc folds whitespace runs
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    tok.save(str(tmp_path / "saved"))
    again = tokenizer.load_tokenizer(str(tmp_path / "saved"))
    assert again.encode(text) == ids and again.fingerprint == tok.fingerprint
    assert pickle.loads(pickle.dumps(tok)).encode(text) == ids


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizer.load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tokenizer.load_tokenizer(str(tmp_path / "nowhere"))
