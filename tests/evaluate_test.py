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


def reference_ppl(m, ids, seq_len, bos=None):
    """Consecutive non-overlapping windows; every token but a window's first scored given its prefix. With a BOS:
    each window is the BOS and seq_len - 1 text tokens, every text token scored and the BOS never."""
    width = seq_len - (bos is not None)
    n = len(ids) // width
    w = torch.tensor(np.asarray(ids[: n * width]).reshape(n, width))
    if bos is not None:
        w = torch.cat([torch.full((n, 1), bos), w], 1)
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


@pytest.mark.parametrize("add_bos", [True, False])
def test_perplexity_follows_the_tokenizers_bos_convention(hf_dir, tmp_path, add_bos):
    """A Hugging Face directory whose tokenizer adds a BOS (as Llama's and Gemma's do) or not: the CLI and training's
    held-out metric (rrt.eval.heldout) give the reference, whose BOS and ids come from transformers' tokenizer."""
    import shutil

    from rrt.eval import heldout

    path, m, tok = hf_dir
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(path / name, model_dir / name)
    tokenizer.save_hf(tokenizer.Tokenizer(tok.backend, 1, 2, add_bos, False), str(model_dir), "llama")
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    plain, full = ref_tok("a", add_special_tokens=False).input_ids, ref_tok("a").input_ids
    bos = full[0] if len(full) > len(plain) else None
    assert (bos is not None) == add_bos and bos in (None, ref_tok.bos_token_id)
    text = open(TEXT, encoding="utf-8").read()[:5000]
    ref, count = reference_ppl(m, ref_tok(text, add_special_tokens=False).input_ids, 48, bos)

    data, out = tmp_path / "text.txt", tmp_path / "results.json"
    data.write_text(text, encoding="utf-8")
    argv = ["--source", str(model_dir), "--task", "perplexity", "--data", str(data), "--seq_len", "48"]
    assert evaluate.main([*argv, "--output", str(out), "--batch_size", "4", "--no_progress"]) == 0
    res = json.loads(out.read_text())["perplexity"]
    assert (res["tokens"], res["bos"]) == (count, add_bos)
    assert abs(res["ppl"] - ref) / ref < 1e-4, (res["ppl"], ref)

    from rrt import formats

    spec = heldout.Spec(seq_len=48, windows=0, batch_size=4)
    texts = {"tinystories": text}
    held = heldout.evaluate(formats.load_model(str(model_dir)), formats.load_tokenizer(str(model_dir)), spec, texts)
    assert held["perplexity"]["tinystories"]["ppl"] == pytest.approx(res["ppl"], rel=1e-6)


def test_windows_definition():
    w = perplexity.windows(list(range(10)), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the partial last window is dropped
    w = perplexity.windows(list(range(10)), 4, bos_id=99)  # BOS + seq_len - 1 text tokens
    assert w.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
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
    text = tmp_path / "text.txt"
    text.write_text("some text\n")
    with pytest.raises(FileNotFoundError):
        evaluate.main(["--source", str(tmp_path / "nope"), "--task", "perplexity", "--data", str(text)])


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--seq_len", "0", "--seq_len: must be >= 2, got 0"),
        ("--seq_len", "1", "--seq_len: must be >= 2, got 1"),
        ("--batch_size", "0", "--batch_size: must be >= 1, got 0"),
        ("--limit", "0", "--limit: must be >= 1, got 0"),
        ("--shots", "-1", "--shots: must be >= 0, got -1"),
        ("--max_len", "1", "--max_len: must be >= 2, got 1"),
    ],
)
def test_cli_bad_numbers_are_argparse_errors(tmp_path, capsys, flag, value, message):
    text = tmp_path / "text.txt"
    text.write_text("some text\n")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--source", "x", "--task", "perplexity", "--data", str(text), flag, value])
    assert message in capsys.readouterr().err


def test_cli_refuses_an_existing_output_unless_overwrite(tmp_path, capsys):
    text, out = tmp_path / "text.txt", tmp_path / "results.json"
    text.write_text("some text\n")
    out.write_text('{"earlier": 1}')
    base = ["--source", "x", "--task", "perplexity", "--data", str(text), "--output", str(out)]
    with pytest.raises(SystemExit):
        evaluate.parse_args(base)
    assert f"--output {out} exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == '{"earlier": 1}'
    assert evaluate.parse_args([*base, "--overwrite"]).overwrite
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--source", "x", "--task", "perplexity", "--data", str(tmp_path / "missing.txt")])
    assert "no such file" in capsys.readouterr().err


def test_every_task_is_checked_before_the_model_is_loaded_or_anything_scored(tmp_path):
    """A good task before a bad one: the bad one is reported first (the source does not even exist)."""
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"query": f"q{i}", "choices": ["a", "b"], "gold": 0}) for i in range(3)))
    nope = str(tmp_path / "no_model")
    for tasks, error, message in [
        (f"mc:{good},hellaswg", ValueError, "unknown task 'hellaswg'"),
        (f"mc:{good},mc:{tmp_path / 'missing.jsonl'}", FileNotFoundError, "missing.jsonl: no such evaluation file"),
        (f"mc:{good},hellaswag", ValueError, "task 'hellaswag' needs data_dir"),
        (f"mc:{good},mc:{good}", ValueError, "two tasks are named 'good'"),
    ]:
        with pytest.raises(error, match=message):
            evaluate.main(["--source", nope, "--tasks", tasks])
    with pytest.raises(ValueError, match="task 'good': 3-shot needs 3 other documents; it has 3"):
        evaluate.main(["--source", nope, "--tasks", f"mc:{good}", "--shots", "3"])


def test_a_task_file_line_that_is_not_json_names_file_and_line(tmp_path):
    from rrt.eval import tasks

    path = tmp_path / "t.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: not JSON"):
        tasks._read_jsonl(str(path))


@pytest.fixture
def short_context_dir(hf_dir, tmp_path):
    """hf_dir's model declaring only 16 positions (max_position_embeddings; the weights do not depend on it)."""
    import shutil

    path = tmp_path / "short"
    shutil.copytree(hf_dir[0], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    return path


def test_max_positions_of_hf_gguf_and_rrt_dirs(short_context_dir, tmp_path):
    from rrt import formats

    assert formats.max_positions(str(short_context_dir)) == 16
    rrt_dir = tmp_path / "converted"
    rrt_dir.mkdir()
    meta = {"format": 1, "model": {}, "conversion": {"source": str(short_context_dir)}}
    (rrt_dir / "rrt_model.json").write_text(json.dumps(meta))
    assert formats.max_positions(str(rrt_dir)) == 16  # from the model it was converted from
    assert formats.max_positions(str(tmp_path / "nothing")) is None
    assert formats.max_positions(gguf.smollm2_gguf_path()) == 8192  # SmolLM2-135M's llama.context_length
    with pytest.warns(formats.PositionWarning, match=r"--seq_len = 17 positions exceeds the 16 that .*short"):
        assert formats.check_positions(17, str(short_context_dir), "--seq_len") == 16
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        formats.check_positions(16, str(short_context_dir), "--seq_len")  # at the limit: silent


def test_evaluate_and_generate_warn_past_the_declared_context(short_context_dir, tmp_path, capsys):
    from rrt import formats, generate

    data = tmp_path / "text.txt"
    data.write_text(open(TEXT, encoding="utf-8").read()[:2000], encoding="utf-8")
    base = ["--source", str(short_context_dir), "--task", "perplexity", "--data", str(data), "--no_progress"]
    with pytest.warns(formats.PositionWarning, match=r"--seq_len = 32 positions exceeds the 16"):
        evaluate.main([*base, "--seq_len", "32"])
    long_prompt = " ".join(["word"] * 40)
    with pytest.warns(formats.PositionWarning, match=r"the longest prompt = \d+ positions exceeds the 16"):
        generate.main(["--source", str(short_context_dir), "--prompt", long_prompt, "--max_new_tokens", "1"])
    with pytest.warns(formats.PositionWarning, match=r"the longest prompt \+ --max_new_tokens = \d+ positions"):
        generate.main(["--source", str(short_context_dir), "--prompt", "Once upon", "--max_new_tokens", "20"])


def test_generate_refuses_a_prompt_of_no_tokens(short_context_dir):
    from rrt import formats, generate

    assert not formats.load_tokenizer(str(short_context_dir)).add_bos  # so "" encodes to nothing at all
    with pytest.raises(ValueError, match="--prompt '' encodes to no tokens"):
        generate.main(["--source", str(short_context_dir), "--prompt", "", "--max_new_tokens", "1"])
