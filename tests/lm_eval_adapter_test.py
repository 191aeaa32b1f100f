"""The lm-eval-harness adapter on a tiny random recursive model with the real SmolLM2 tokenizer, offline.

Custom task YAMLs over JSONL files in tmp_path (`dataset_path: json`), loaded with `include_path`; the harness's
results must match rrt's own scoring (rrt.eval.fewshot) and a direct forward pass request by request.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rrt import model as model_lib  # noqa: E402
from rrt.eval import fewshot  # noqa: E402
from rrt.formats import gguf, rrt_dir  # noqa: E402
from rrt.formats import tokenizer as tokenizer_lib  # noqa: E402

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
DOCS = [
    {"query": "Question: What color is the sky?\nAnswer:", "choices": ["blue", "green", "a loud noise"], "gold": 0},
    {"query": "The cat sat on the", "choices": ["mat", "quantum theorem"], "gold": 0},
    {"query": "Two plus two is", "choices": ["four", "five", "twenty-two"], "gold": 0},
    {"query": "Paris is the capital of ", "choices": ["France", "Spain"], "gold": 0},
]
TEXTS = [{"text": "Once upon a time there was a small dog who liked to run in the park."}, {"text": "Hello world."}]


def _task_yamls(root) -> None:
    mc, txt = root / "mc.jsonl", root / "texts.jsonl"
    mc.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    txt.write_text("".join(json.dumps(d) + "\n" for d in TEXTS))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "rrt_tiny_mc.yaml").write_text(
        f"task: rrt_tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {mc}\n"
        + textwrap.dedent("""\
            output_type: multiple_choice
            doc_to_text: "{{query}}"
            doc_to_choice: "{{choices}}"
            doc_to_target: "{{gold}}"
            metric_list:
              - metric: acc
              - metric: acc_norm
            """)
    )
    (root / "rrt_tiny_rolling.yaml").write_text(
        f"task: rrt_tiny_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {txt}\n"
        + textwrap.dedent("""\
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list:
              - metric: word_perplexity
            """)
    )
    (root / "rrt_tiny_gen.yaml").write_text(
        f"task: rrt_tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {mc}\n"
        + textwrap.dedent("""\
            output_type: generate_until
            doc_to_text: "{{query}}"
            doc_to_target: "{{choices[gold]}}"
            generation_kwargs:
              until: ["\\n", "."]
              max_gen_toks: 6
              do_sample: false
            metric_list:
              - metric: exact_match
            """)
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    tok = tokenizer_lib.load_tokenizer(gguf.smollm2_gguf_path())
    model = model_lib.Decoder(CFG, rngs=nnx.Rngs(0))
    params = model_lib.flat_params(model)  # give the LoRA B factors values so every loop differs
    params = {k: (v + 0.05 if k.endswith("_b") else v) for k, v in params.items()}
    model = model_lib.from_params(CFG, params)
    rrt_dir.save(str(root / "model"), CFG, params, tokenizer=tok)
    _task_yamls(root)
    return root, model, tok


PAD = 128  # every direct forward pass below runs at this one length: one compilation per loop


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef, state, tokens_1xT, loop):
    m = nnx.merge(graphdef, state)
    _, hiddens = m(tokens_1xT, return_loop_hiddens=True)
    return jax.nn.log_softmax(m.logits(hiddens[loop - 1]), -1)[0]


def _logp(model, ids: list[int], loop: int) -> np.ndarray:
    """[len(ids), V] next-token log-probs of a plain forward pass (right padding cannot reach back: causal)."""
    assert len(ids) <= PAD
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray([ids + [0] * (PAD - len(ids))]), loop))[: len(ids)]


def _direct_logprobs(model, ids: list[int], loop: int) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1, exiting after `loop`."""
    return np.take_along_axis(_logp(model, ids, loop)[:-1], np.asarray(ids[1:])[:, None], -1)[:, 0]


def _greedy(model, ids: list[int], n: int, loop: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(_logp(model, ids + out, loop)[-1].argmax()))
    return out


def test_simple_evaluate_matches_rrt_scoring(setup):
    """All three request types through `lm_eval.simple_evaluate`, exiting after loop 1 of 2."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from rrt.eval import lm_eval_adapter

    root, model, tok = setup
    loop = 1
    lm = lm_eval_adapter.RRTLM(model=model, tokenizer=tok, batch_size=4, loop=loop)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["rrt_tiny_mc", "rrt_tiny_rolling", "rrt_tiny_gen"],
        task_manager=TaskManager(include_path=str(root), include_defaults=False),
        log_samples=True,
    )
    # Multiple choice: same requests and numbers as rrt.eval.fewshot's generic mc task on the same file.
    ours = fewshot.evaluate_tasks(model, tok, [f"mc:{root / 'mc.jsonl'}"], progress=False)["mc"]["per_loop"][loop - 1]
    res = out["results"]["rrt_tiny_mc"]
    assert res["acc,none"] == pytest.approx(ours["acc"])
    assert res["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    for s in out["samples"]["rrt_tiny_mc"]:
        doc = s["doc"]
        for (ctx, cont), (ll, _) in zip((r for r in s["arguments"]), (r[0] for r in s["resps"])):
            ids = tok.encode(ctx + cont)  # the harness moves trailing spaces into the continuation
            n_cont = len(ids) - len(tok.encode(ctx.rstrip()))
            assert ll == pytest.approx(_direct_logprobs(model, ids, loop)[-n_cont:].sum(), abs=1e-4), doc
    # Rolling loglikelihood: the whole text given the prefix token (BOS).
    for s in out["samples"]["rrt_tiny_rolling"]:
        ids = [lm.prefix_token_id] + tok.encode(s["doc"]["text"])
        assert s["resps"][0][0] == pytest.approx(_direct_logprobs(model, ids, loop).sum(), abs=1e-3)
    # Greedy generation: a plain argmax loop, cut at the first stop string.
    for s in out["samples"]["rrt_tiny_gen"]:
        text = tok.decode(_greedy(model, tok.encode(s["doc"]["query"]), 6, loop))
        for stop in ("\n", "."):
            text = text.split(stop)[0]
        assert s["resps"][0][0] == text


def test_rolling_windows_cover_every_token(setup):
    """A text longer than max_length: the harness's windows, each scored by a plain forward pass, summed."""
    from lm_eval import utils as lm_utils

    from rrt.eval import lm_eval_adapter

    _, model, tok = setup
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 5)

    class Req:
        args = (text,)

    lm = lm_eval_adapter.RRTLM(model=model, tokenizer=tok, batch_size=2, max_length=16)
    (total,) = lm.loglikelihood_rolling([Req()], disable_tqdm=True)
    ids = tok.encode(text)
    windows = [
        lm_utils.make_disjoint_window(w)
        for w in lm_utils.get_rolling_token_windows(ids, lm.prefix_token_id, max_seq_len=16, context_len=1)
    ]
    assert len(windows) > 2 and sum(len(cont) for _, cont in windows) == len(ids)
    expected = sum(_direct_logprobs(model, ctx + cont, CFG.n_loops)[-len(cont) :].sum() for ctx, cont in windows)
    assert total == pytest.approx(expected, abs=1e-3)


# default run under 20 min on CI; scoring through lm-eval is checked by test_simple_evaluate_matches_rrt_scoring
@pytest.mark.slow
def test_cli_registers_and_runs(setup, tmp_path):
    """`rrt-lm-eval --model rrt ... --include_path <dir> --limit 3` (the console script, as a subprocess): the
    harness's CLI with rrt registered scores the local JSONL task, and its accuracy is rrt's own `mc:` task's on the
    same three items."""
    root, model, tok = setup
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    script = os.path.join(os.path.dirname(sys.executable), "rrt-lm-eval")  # the installed entry point
    entry = [script] if os.path.isfile(script) else [sys.executable, "-m", "rrt.eval.lm_eval_adapter"]
    limit, loop = 3, 1
    cmd = [
        *entry,
        "--model",
        "rrt",
        "--model_args",
        f"path={root / 'model'},loop={loop}",
        "--tasks",
        "rrt_tiny_mc",
        "--include_path",
        str(root),
        "--limit",
        str(limit),
        "--batch_size",
        "2",
        "--log_samples",
        "--output_path",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rrt_tiny_mc" in proc.stdout and "acc_norm" in proc.stdout
    found = {f.split("_")[0]: os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs}
    assert {"results", "samples"} <= set(found), found
    with open(found["results"]) as f:
        results = json.load(f)["results"]["rrt_tiny_mc"]
    with open(found["samples"]) as f:
        assert len(f.readlines()) == limit  # the harness scored exactly the first `limit` items
    ours = fewshot.evaluate_tasks(model, tok, [f"mc:{root / 'mc.jsonl'}"], limit=limit, progress=False)["mc"]
    ours = ours["per_loop"][loop - 1]
    assert results["acc,none"] == pytest.approx(ours["acc"])
    assert results["acc_norm,none"] == pytest.approx(ours["acc_norm"])
