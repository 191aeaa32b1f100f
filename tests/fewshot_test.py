"""Few-shot tasks and scoring: the shared files' first records, the k-shot sampler, acc vs acc_norm by hand,
generic mc:/partial: tasks, packed batches vs one request per row, per-loop results and the CLI.

A tiny random recursive model with the real SmolLM2 tokenizer; the real-model agreement with Hugging Face is
docs/fewshot_check.py (minutes, not a unit test).
"""

import json
import os

import jax
import jax.numpy as jnp
import needs
import numpy as np
import pytest
from flax import nnx

from rrt import model as model_lib
from rrt.eval import fewshot, scoring
from rrt.eval import tasks as tasks_lib
from rrt.formats import gguf
from rrt.formats import tokenizer as tokenizer_lib

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture
def shared_data():
    if not os.path.isdir(os.path.join(DATA_DIR, "eval")):
        needs.missing(f"{DATA_DIR}/eval: no such directory")


needs_data = pytest.mark.usefixtures("shared_data")
CFG = model_lib.ModelConfig(
    vocab_size=49152,
    d_model=32,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=64,
    n_loops=2,
    rank_attn=2,
    rank_mlp=2,
    per_position_norms=True,
)


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.load_tokenizer(gguf.smollm2_gguf_path())


@pytest.fixture(scope="module")
def model():
    m = model_lib.Decoder(CFG, rngs=nnx.Rngs(0))
    params = {k: (v + 0.05 if k.endswith("_b") else v) for k, v in model_lib.flat_params(m).items()}  # loops differ
    return model_lib.from_params(CFG, params)


@pytest.fixture(scope="module")
def scorer(model):
    return scoring.make_scorer(model)


def _direct(model, ids: list[int], n_cont: int, loop: int) -> float:
    """Summed log-prob of the last n_cont tokens from one plain forward pass, exiting after `loop`."""
    _, hiddens = model(jnp.asarray([ids]), return_loop_hiddens=True)
    logp = jax.nn.log_softmax(model.logits(hiddens[loop - 1]), -1)[0, :-1]
    return float(jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], -1)[-n_cont:].sum())


# --- the shared files -----------------------------------------------------------------------------------------


@needs_data
def test_paper_task_files_parse_like_lm_eval():
    sizes = {"lambada": 5153, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267, "arc_easy": 2376,
             "arc_challenge": 1172, "openbookqa": 500}  # fmt: skip
    loaded = {name: tasks_lib.load(name, DATA_DIR) for name in tasks_lib.PAPER_TASKS}
    assert {k: len(t.docs) for k, t in loaded.items()} == sizes
    hs = loaded["hellaswag"].docs[0]
    assert hs["query"] == "Roof shingle removal: A man is sitting on a roof. He"  # lm-eval: ctx_b.capitalize()
    assert hs["choices"][3] == "starts pulling up roofing on a roof." and hs["gold"] == 3
    wikihow = next(d for d in loaded["hellaswag"].docs if d["query"].startswith("Cleaning windows: How to"))
    assert wikihow["query"].endswith("spray. you")  # WikiHow: ctx_b is empty, nothing is capitalized
    piqa = loaded["piqa"].docs[0]
    assert piqa["query"] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa["choices"][0].startswith("Provide the guinea pig") and piqa["gold"] == 0
    lam = loaded["lambada"].docs[0]
    assert lam["context"].endswith("I don't care about") and lam["target"] == " signs"
    wg = loaded["winogrande"].docs[0]
    assert wg["context_options"][1].endswith("so Maria") and wg["gold"] == 1
    arc = loaded["arc_easy"].docs[0]
    assert arc["query"].startswith("Question: Which statement") and arc["query"].endswith("?\nAnswer:")
    assert loaded["openbookqa"].docs[1] == {
        "query": "There is most likely going to be fog around:",
        "choices": ["a marsh", "a tundra", "the plains", "a desert"],
        "gold": 0,
    }
    reqs = tasks_lib.requests(loaded["winogrande"], limit=1)
    assert [(r.context, r.continuation) for r in reqs] == [
        (o, " always got the easier cases.") for o in wg["context_options"]
    ]


def test_hellaswag_query_capitalizes_only_activitynet_ctx_b():
    assert tasks_lib.hellaswag_query("High jump: A boy is running down a track. the boy") == (
        "High jump: A boy is running down a track. The boy"
    )
    assert tasks_lib.hellaswag_query("Skiing: the man") == "Skiing: The man"
    line = "Cleaning windows: How to clean your rv windows fast. you"
    assert tasks_lib.hellaswag_query(line) == line


@needs_data
def test_fewshot_sampler_never_includes_the_item():
    task = tasks_lib.load("openbookqa", DATA_DIR)
    for item in range(0, 500, 7):
        picked = tasks_lib.fewshot_indices(len(task.docs), item, 5, seed=1234, docs=task.docs)
        assert len(set(picked)) == 5 and item not in picked
        assert all(task.docs[j] != task.docs[item] for j in picked)
    # Fixed by (seed, item): the same with another --limit; another seed draws others.
    a = tasks_lib.requests(task, shots=3, limit=4)
    b = tasks_lib.requests(task, shots=3, limit=9)[: len(a)]
    assert a == b and a != tasks_lib.requests(task, shots=3, limit=4, seed=1)
    ctx = a[0].context.split("\n\n")
    assert len(ctx) == 4 and ctx[-1] == task.docs[0]["query"]  # 3 solved examples, then the question
    assert all(tasks_lib.TARGET_DELIMITER in c for c in ctx[:3])


def test_sampler_skips_duplicates_of_the_item():
    docs = [{"x": 1}, {"x": 1}, {"x": 2}, {"x": 3}]
    for seed in range(20):
        assert sorted(tasks_lib.fewshot_indices(4, 0, 2, seed, docs)) == [2, 3]
    with pytest.raises(ValueError, match="only 2 available"):
        tasks_lib.fewshot_indices(4, 0, 3, 0, docs)


# --- metrics by hand ------------------------------------------------------------------------------------------


def test_acc_vs_acc_norm_by_hand():
    """Choices "a" (1 char) and "bbbb" (4 chars) with log-probs -2 and -4: acc picks "a", acc_norm -2/1 < -4/4
    picks "bbbb". Loop 1 prefers "a" in both."""
    task = tasks_lib.Task("t", "mc", [{"query": "q", "choices": ["a", "bbbb"], "gold": 1}], "")
    reqs = tasks_lib.requests(task)
    ll = np.array([[-1.0, -9.0], [-2.0, -4.0]])  # [R, N]
    res = fewshot.task_metrics(task, reqs, ll, np.zeros_like(ll, bool))
    assert (res["acc"], res["acc_norm"], res["n"]) == (0.0, 1.0, 1)
    assert res["per_loop"][0] == {"loop": 1, "acc": 0.0, "acc_stderr": None, "acc_norm": 0.0, "acc_norm_stderr": None}


def test_cloze_acc_and_perplexity_by_hand():
    task = tasks_lib.Task("t", "cloze", [{"context": "c", "target": " w"}] * 4, "")
    reqs = tasks_lib.requests(task)
    ll = np.array([[-1.0, -2.0, -3.0, -2.0]])
    greedy = np.array([[True, False, True, True]])
    res = fewshot.task_metrics(task, reqs, ll, greedy)
    assert res["acc"] == 0.75 and res["ppl"] == pytest.approx(np.exp(2.0))
    assert res["acc_stderr"] == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)  # lm-eval's mean_stderr
    assert res["ppl_stderr"] == pytest.approx(np.exp(2.0) * np.std([1, 2, 3, 2], ddof=1) / 2)


# --- tokenization and batching --------------------------------------------------------------------------------


class _WithBos:
    """The real tokenizer, configured to add BOS."""

    def __init__(self, tok):
        self._tok, self.add_bos, self.bos_id, self.eos_id = tok, True, tok.bos_id, tok.eos_id

    def encode_batch(self, texts):
        return self._tok.encode_batch(texts)


def test_encode_pairs_follows_lm_eval(tok):
    ((ctx, cont),) = fewshot.encode_pairs(tok, [("Paris is the capital of ", "France")])
    assert ctx == tok.encode("Paris is the capital of") and ctx + cont == tok.encode("Paris is the capital of France")
    ((ctx, cont),) = fewshot.encode_pairs(tok, [("", " hello")])  # empty context: the prefix token (BOS)
    assert ctx == [tok.bos_id] and cont == tok.encode(" hello")
    ((ctx, cont),) = fewshot.encode_pairs(_WithBos(tok), [("a b", " c")])
    assert ctx == [tok.bos_id] + tok.encode("a b") and cont == tok.encode("a b c")[len(tok.encode("a b")) :]


def test_packed_batches_equal_one_request_per_row(tok, model, scorer):
    pairs = [("The cat sat on the", " mat"), ("Two plus two is", " four"), ("Q: sky color?\nA:", " blue sky")]
    pairs += [(f"Item {i}: " + "word " * i, " end") for i in range(9)]
    encoded = fewshot.encode_pairs(tok, pairs)
    packed, g_packed = fewshot.loglikelihoods(scorer, encoded, batch_size=2)
    alone, g_alone = fewshot.loglikelihoods(scorer, encoded, batch_size=1, pack_rows=False)
    np.testing.assert_allclose(packed, alone, atol=1e-4)
    assert (g_packed == g_alone).all()
    for i in (0, 5, 11):
        ctx, cont = encoded[i]
        for loop in (1, 2):
            assert packed[loop - 1, i] == pytest.approx(_direct(model, ctx + cont, len(cont), loop), abs=1e-4)
    # Left truncation to max_len, as the harness: (ctx + cont)[-(max_len + 1):]
    ctx, cont = encoded[-1]
    trunc, _ = fewshot.loglikelihoods(scorer, [(ctx, cont)], batch_size=1, max_len=8)
    assert trunc[-1, 0] == pytest.approx(_direct(model, (ctx + cont)[-9:], len(cont), 2), abs=1e-4)


def test_pack_is_best_fit_decreasing():
    assert fewshot.pack([5, 3, 8, 2, 7], 10) == [[2, 3], [4, 1], [0]]
    lengths = list(np.random.default_rng(0).integers(1, 300, 5000))
    rows = fewshot.pack(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(5000))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert len(rows) <= 1.02 * sum(lengths) / 512 + 1


# --- generic tasks, per-loop results, training metrics, the CLI -----------------------------------------------


def _generic_files(tmp_path):
    mc = tmp_path / "my_mc.jsonl"
    mc.write_text(
        "\n".join(
            json.dumps(d)
            for d in [
                {"query": "The cat sat on the", "choices": ["mat", "moon"], "gold": 0},
                {"query": "Two plus two is", "choices": ["four", "five", "six"], "gold": 0},
                {"query": "Water is", "choices": ["wet", "dry"], "gold": 0},
            ]
        )
    )
    partial = tmp_path / "my_partial.jsonl"
    partial.write_text(
        json.dumps(
            {"context_options": ["Tom beat Ann so Tom", "Tom beat Ann so Ann"], "continuation": "won.", "gold": 0}
        )
        + "\n"
        + json.dumps({"context_options": ["It rained so I", "It was dry so I"], "continuation": "got wet.", "gold": 0})
    )
    return mc, partial


def test_generic_tasks_and_per_loop(tmp_path, tok, model, scorer):
    mc, partial = _generic_files(tmp_path)
    res = fewshot.evaluate_tasks(model, tok, [f"mc:{mc}", f"partial:{partial}"], shots=1, progress=False, scorer=scorer)
    assert set(res) == {"my_mc", "my_partial"}
    for name, n in (("my_mc", 3), ("my_partial", 2)):
        r = res[name]
        assert r["n"] == n and r["shots"] == 1 and len(r["per_loop"]) == CFG.n_loops
        assert {k: r[k] for k in ("acc", "acc_norm")} == {k: r["per_loop"][-1][k] for k in ("acc", "acc_norm")}
        assert all(0 <= r[k] <= 1 for k in ("acc", "acc_norm"))
    assert res["my_partial"]["acc"] == res["my_partial"]["acc_norm"]  # one shared continuation
    reqs = tasks_lib.requests(tasks_lib.load(f"mc:{mc}"), limit=1)
    assert [(r.context, r.continuation) for r in reqs] == [
        ("The cat sat on the", " mat"),
        ("The cat sat on the", " moon"),
    ]
    reqs = tasks_lib.requests(tasks_lib.load(f"partial:{partial}"), shots=1, limit=1)
    assert reqs[0].context == "It rained so I got wet.\n\nTom beat Ann so Tom" and reqs[0].continuation == " won."


def test_bad_records_fail_loudly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 2}))
    with pytest.raises(ValueError, match="bad.jsonl: record 0: gold 2"):
        tasks_lib.load(f"mc:{bad}")
    with pytest.raises(ValueError, match="unknown task"):
        tasks_lib.load("hellaswagg", DATA_DIR)


def test_in_process_evaluation_is_flat_and_resumable(tmp_path, tok, model):
    from rrt.eval import heldout

    mc, _ = _generic_files(tmp_path)
    texts = {"story": "Once upon a time there was a dog. " * 40}
    spec = heldout.Spec(seq_len=32, windows=2, tasks=(f"mc:{mc}",), limit=2)
    seen = []
    results = heldout.evaluate(model, tok, spec, texts, on_result=lambda kind, name, res, s: seen.append(name))
    out = heldout.flat_metrics(results, model.cfg.n_loops)
    assert {"eval/my_mc/acc", "eval/my_mc/acc_norm", "eval/my_mc/acc_loop1", "eval/story/ppl"} <= set(out)
    assert all(isinstance(v, float) for v in out.values())
    assert seen == ["story", "my_mc"]
    direct = fewshot.evaluate_tasks(model, tok, [f"mc:{mc}"], limit=2, progress=False)["my_mc"]
    assert out["eval/my_mc/acc"] == direct["acc"]
    # Everything already done is kept, not scored again.
    again = heldout.evaluate(model, tok, spec, texts, done=results, on_result=lambda *a: seen.append("again"))
    assert again == results and seen == ["story", "my_mc"]


def test_evaluate_cli_writes_json(tmp_path, tok, model):
    from rrt import evaluate
    from rrt.formats import rrt_dir

    mc, partial = _generic_files(tmp_path)
    rrt_dir.save(str(tmp_path / "m"), CFG, model_lib.flat_params(model), tokenizer=tok)
    out = tmp_path / "results.json"
    argv = ["--source", str(tmp_path / "m"), "--tasks", f"mc:{mc},partial:{partial}", "--output", str(out)]
    assert evaluate.main(argv + ["--no_progress", "--batch_size", "2"]) == 0
    res = json.loads(out.read_text())
    direct = fewshot.evaluate_tasks(model, tok, [f"mc:{mc}"], progress=False)["my_mc"]
    assert res["my_mc"]["acc"] == direct["acc"] and res["my_mc"]["per_loop"] == direct["per_loop"]
    assert res["my_partial"]["n"] == 2
