"""`python -m rrt.evaluate --task perplexity` against the same definition computed with transformers (torch)."""

import json
import math

import numpy as np
import pytest
import torch
import transformers
from hf_parity_test import randomize

from rrt import evaluate
from rrt.eval import perplexity
from rrt.formats import gguf, tokenizer

TEXT = "../shared/data/corpora/tinystories_val.txt"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tok = tokenizer.load_tokenizer(gguf.smollm2_gguf_path())
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    m = randomize(transformers.LlamaForCausalLM(cfg), norm_center=1.0)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(0.05)  # keep logits moderate so perplexity is a finite, testable number
    path = tmp_path_factory.mktemp("hf")
    m.save_pretrained(path)
    tok.save(str(path))
    return path, m, tok


def reference_ppl(m, ids, seq_len):
    """Consecutive non-overlapping windows; every token but a window's first scored given its prefix."""
    n = len(ids) // seq_len
    w = torch.tensor(np.asarray(ids[: n * seq_len]).reshape(n, seq_len))
    with torch.no_grad():
        logp = torch.log_softmax(m(w).logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, w[:, 1:, None])[..., 0]
    return math.exp(nll.mean().item()), nll.numel()


def test_perplexity_cli_matches_transformers(hf_dir, tmp_path):
    path, m, tok = hf_dir
    text = open(TEXT, encoding="utf-8").read()[:6000]
    data = tmp_path / "text.txt"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "results.json"
    args = [
        "--source",
        str(path),
        "--task",
        "perplexity",
        "--data",
        str(data),
        "--seq_len",
        "64",
        "--output",
        str(out),
        "--batch_size",
        "3",
        "--no_progress",
    ]
    assert evaluate.main(args) == 0
    res = json.loads(out.read_text())["perplexity"]
    ref, count = reference_ppl(m, tok.encode(text), 64)  # no special tokens, whole file as one stream
    assert res["tokens"] == count
    assert abs(res["ppl"] - ref) / ref < 1e-4, (res["ppl"], ref)
    assert set(res) >= {"ppl", "nll", "tokens"} and len(res["per_loop"]) == 1


def test_windows_definition():
    w = perplexity.windows(list(range(10)), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the partial last window is dropped
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity.windows([1, 2], 4)


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--source", "x", "--task", "perplexity"])  # no --data
    assert "--data" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        evaluate.heldout_text(str(empty), 1.0)
    with pytest.raises(FileNotFoundError):
        evaluate.main(["--source", str(tmp_path / "nope"), "--task", "perplexity", "--data", str(empty)])


def test_a_task_file_line_that_is_not_json_names_file_and_line(tmp_path):
    from rrt.eval import tasks

    path = tmp_path / "t.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: not JSON"):
        tasks._read_jsonl(str(path))
