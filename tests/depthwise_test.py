"""The depth-wise batching engine against decoding each request alone with the same exit rule."""

import numpy as np
import pytest
from decode_test import forward, prompts, tiny

from rrt.decode import cache as decode
from rrt.decode import depthwise, early_exit

LENGTHS = (5, 9, 3, 12, 7)
BUDGETS = [6, 3, 8, 5, 7]  # requests finish at different times, so rows are refilled mid-run
MAX_LEN = 64


def alone(m, ps, rule, sampling=decode.GREEDY, eos_id=None) -> decode.Generation:
    """Each request decoded by itself (static batching, batch 1), with its own request id's sampling keys."""
    outs = [
        decode.generate(m, [p], n, rule=rule, sampling=sampling, eos_id=eos_id, max_len=MAX_LEN, request_ids=[i])
        for i, (p, n) in enumerate(zip(ps, BUDGETS))
    ]
    return decode.Generation([o.tokens[0] for o in outs], [o.loops[0] for o in outs])


@pytest.mark.parametrize("strategy", ["cycle", "sequence"])
@pytest.mark.parametrize("kind,threshold,slots", [("max_prob", 0.5, 2), ("cosine", 0.8, 3)])
def test_engine_equals_decoding_alone_greedy(strategy, kind, threshold, slots):
    """Mixed exit depths; with `cosine` the engine runs the head only for the slots that exit."""
    m = tiny(strategy, 4, seed=2)
    ps = prompts(3, LENGTHS)
    rule = early_exit.ExitRule(kind, threshold)
    want = alone(m, ps, rule)
    got = depthwise.generate(m, ps, BUDGETS, slots=slots, rule=rule, max_len=MAX_LEN, n_steps=2)
    assert got.tokens == want.tokens
    assert got.loops == want.loops
    decoded = np.concatenate([x[1:] for x in got.loops])  # the first token comes from the full-depth prefill
    assert len(set(decoded.tolist())) > 1, "the rule should exit at mixed depths"
    if kind == "max_prob":
        assert decoded.min() == 1 and decoded.max() == m.cfg.n_loops
    assert got.busy_slot_steps > got.steps  # several rows were in use at once


def test_engine_equals_decoding_alone_agreement_sampled_eos():
    m = tiny("cycle", 4, seed=3)
    ps = prompts(4, LENGTHS)
    rule = early_exit.ExitRule("agreement")
    sampling = decode.Sampling(temperature=1.0, top_k=8, top_p=0.9)
    eos = 24  # sampled mid-stream by several requests: rows finish early and are refilled
    want = alone(m, ps, rule, sampling, eos_id=eos)
    got = depthwise.generate(m, ps, BUDGETS, slots=3, rule=rule, sampling=sampling, eos_id=eos, max_len=MAX_LEN)
    assert got.tokens == want.tokens
    assert got.loops == want.loops


def test_engine_without_exits_is_full_depth():
    m = tiny("cycle", 4, seed=2)
    ps = prompts(3, LENGTHS)
    got = depthwise.generate(m, ps, BUDGETS, slots=2, rule=early_exit.ExitRule("max_prob", 1.5), max_len=MAX_LEN)
    seqs, _ = decode.padded_prompts([p + t[:-1] for p, t in zip(ps, got.tokens)], len(ps))
    logits, _ = forward(m, seqs)
    for p, toks, full in zip(ps, got.tokens, logits):
        assert toks == np.argmax(full[len(p) - 1 : len(p) - 1 + len(toks)], axis=-1).tolist()
    assert all(set(x) == {m.cfg.n_loops} for x in got.loops)


def test_generate_cli(tmp_path, capsys):
    """`python -m rrt.generate` on an rrt dir: greedy, early exit, and the depth-wise engine give the same text
    when the rule never fires."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from rrt import generate
    from rrt.formats import rrt_dir
    from rrt.formats import tokenizer as tokenizer_lib
    from rrt.model import flat_params

    m = tiny("cycle", 4, seed=2)
    words = ["[UNK]", "<eos>"] + [f"w{i}" for i in range(m.cfg.vocab_size - 2)]
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tokenizer_lib.Tokenizer(backend, bos_id=None, eos_id=1, add_bos=False, add_eos=False)
    path = str(tmp_path / "model")
    rrt_dir.save(path, m.cfg, {k: np.asarray(v) for k, v in flat_params(m).items()}, tokenizer=tok)
    base = ["--source", path, "--prompt", "w3 w7 w11", "--max_new_tokens", "4", "--ignore_eos"]
    texts = []
    cosine = ["--exit_rule", "cosine", "--exit_threshold", "1.5", "--depthwise_slots", "2"]
    for extra in ([], ["--exit_threshold", "1.5"], ["--exit_threshold", "1.5", "--depthwise_slots", "2"], cosine):
        assert generate.main(base + extra) == 0
        texts.append(capsys.readouterr().out.splitlines()[0])
    assert texts[0].startswith("w3 w7 w11") and len(texts[0].split()) > 3
    assert texts[0] == texts[1] == texts[2] == texts[3]
    with pytest.raises(SystemExit):  # cosine needs its threshold
        generate.parse_args(base + ["--exit_rule", "cosine"])
