"""LoRA initialisation at partial rank, against numpy, and asvd calibration against transformers.

* svd: the factors are numpy's truncated SVD of each position's residual, and s = alpha / r by value.
* asvd: the factors reach the closed-form minimum of the calibration-weighted error ||X (R - a b)||_F (Eckart-Young
  on L^T R with C = L L^T, numpy's Cholesky, not our eigendecomposition), plain SVD's weighted error is larger, and
  a dead input feature gives no NaN.
* The calibration moments equal X^T X of the inputs transformers' own projections receive (forward hooks).
* The calibration rows and the CLI record: segments and positions restart per document, held-out tails excluded.
"""

import json

import numpy as np
import pytest
import torch
from recursive_test import VOCAB, calibration_of, llama_hf, load, neox_hf

from rrt import calibrate, convert
from rrt import model as model_lib
from rrt.data import documents


def weighted_err(x_NxI, resid_IxO, approx_IxO) -> float:
    return float(np.sum((x_NxI @ (resid_IxO - approx_IxO)) ** 2))


def correlated_inputs(rng, n, i):
    """Inputs with a spread of scales and correlations, like a projection's (not white noise)."""
    mix = rng.standard_normal((i, i)) * np.logspace(0, -2, i)[None, :]
    return rng.standard_normal((n, i)) @ mix.T + 0.3 * rng.standard_normal((1, i))


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_truncated_svd_at_partial_rank_is_numpys(shape):
    rng = np.random.default_rng(0)
    resid = rng.standard_normal(shape).astype(np.float32)
    r = 5
    a, b, _ = convert.truncated_svd(resid, r)
    u, s, vt = np.linalg.svd(resid.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(a @ b, (u[:, :r] * s[:r]) @ vt[:r], atol=1e-5)
    np.testing.assert_allclose(np.abs(a.T @ u[:, :r]), np.eye(r), atol=1e-5)  # a = U_r up to signs
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), s[:r], rtol=1e-5)  # b = S_r V_r^T


def test_convert_svd_factors_and_scale_by_value(tmp_path):
    """Through convert(): position l's s * a_l b_l is numpy's rank-r SVD of W_l - W'_slot, s = alpha / r = 0.75."""
    base, params = load(llama_hf(layers=4), tmp_path)
    rec = convert.Recursion(loops=2, init="average", rank_attn=4, rank_mlp=4, alpha=3.0, lora_init="svd")
    cfg, new, _ = convert.convert(base, params, rec, progress=False)
    assert cfg.lora_scale("q") == 0.75 and cfg.lora_scale("down") == 0.75
    ids = cfg.layer_ids().reshape(-1)
    for proj in ("q", "down"):
        w = np.asarray(params[f"layers/{proj}"], np.float64)
        for l in range(cfg.n_layers):
            tied = [p for p in range(cfg.n_layers) if ids[p] == ids[l]]
            resid = w[l] - w[tied].mean(axis=0)  # average init: the mean of the tied layers
            u, s, vt = np.linalg.svd(resid, full_matrices=False)
            want = (u[:, :4] * s[:4]) @ vt[:4]
            got = 0.75 * new[f"relax/{proj}_a"][l].astype(np.float64) @ new[f"relax/{proj}_b"][l]
            np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
            # without the scale the product would be off by 1 / s: the scale is not cancelled anywhere
            assert np.abs(got / 0.75 - want).max() > 0.1 * np.abs(want).max()


@pytest.mark.parametrize("shape", [(16, 24), (24, 10)])
def test_asvd_reaches_the_weighted_optimum_and_beats_plain_svd(shape):
    rng = np.random.default_rng(1)
    i, o = shape
    x = correlated_inputs(rng, 200, i)
    resid = rng.standard_normal(shape)
    c = x.T @ x
    r = 4
    a, b, _ = convert.weighted_svd(resid, *convert.whitening(c, 0.0), r)
    # closed form (Eckart-Young in the weighted norm): C = L L^T, the error's minimum is the tail of L^T R's spectrum
    chol = np.linalg.cholesky(c)
    tail = np.sum(np.linalg.svd(chol.T @ resid, compute_uv=False)[r:] ** 2)
    got = weighted_err(x, resid, a.astype(np.float64) @ b)
    assert got == pytest.approx(tail, rel=1e-4)
    a_svd, b_svd, _ = convert.truncated_svd(resid, r)
    plain = weighted_err(x, resid, a_svd.astype(np.float64) @ b_svd)
    assert plain > 1.2 * got, (plain, got)
    # and no other rank-r factorisation nearby does better
    for _ in range(5):
        da, db = 1e-2 * rng.standard_normal(a.shape), 1e-2 * rng.standard_normal(b.shape)
        assert weighted_err(x, resid, (a + da) @ (b + db)) >= got * (1 - 1e-9)


@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_asvd_with_a_dead_input_feature_gives_finite_factors(damping):
    rng = np.random.default_rng(2)
    x = correlated_inputs(rng, 100, 10)
    x[:, 3] = 0.0  # a dead feature: C is singular
    resid = rng.standard_normal((10, 7))
    for r in (3, 7):
        a, b, lam = convert.weighted_svd(resid, *convert.whitening(x.T @ x, damping), r)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(np.isfinite(lam))
    # at full rank the live features' part of the function is exact either way
    assert weighted_err(x, resid, a.astype(np.float64) @ b) < 1e-8 * weighted_err(x, resid, 0 * resid)
    st, st_inv = convert.whitening(np.zeros((4, 4)), damping)  # no data at all: the identity, not NaN
    np.testing.assert_allclose(st @ st_inv, np.eye(4), atol=1e-12)


@pytest.mark.parametrize("make", [llama_hf, neox_hf], ids=["llama", "neox"])
def test_moments_equal_the_inputs_of_transformers_projections(make, tmp_path):
    m = make(layers=3)
    base, params = load(m, tmp_path)
    tokens = np.random.default_rng(3).integers(0, VOCAB, (5, 24))
    got = calibrate.collect_moments(base, params, calibration_of(tokens), batch_size=2, progress=False)
    names = (
        {
            "attn_in": "self_attn.q_proj",
            "o_in": "self_attn.o_proj",
            "mlp_in": "mlp.gate_proj",
            "down_in": "mlp.down_proj",
        }
        if make is llama_hf
        else {
            "attn_in": "attention.query_key_value",
            "o_in": "attention.dense",
            "mlp_in": "mlp.dense_h_to_4h",
            "down_in": "mlp.dense_4h_to_h",
        }
    )
    want = {t: [None] * base.n_layers for t in names}
    hooks = []
    for name, module in m.named_modules():
        for tap, suffix in names.items():
            if name.endswith(suffix):
                layer = int(name.split(".layers.")[1].split(".")[0])

                def hook(mod, args, tap=tap, layer=layer):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    want[tap][layer] = (x.T @ x).numpy()

                hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        m(torch.tensor(tokens))
    for h in hooks:
        h.remove()
    for tap in names:
        ref = np.stack(want[tap])
        assert got[tap].shape == ref.shape
        assert np.linalg.norm(got[tap] - ref) / np.linalg.norm(ref) < 1e-5, tap


def test_calibration_rows_restart_per_document_and_skip_the_heldout_tail(tmp_path):
    path = tmp_path / "corpus.txt"
    docs = [f"document {i} " + "word " * (3 + i % 5) for i in range(40)]
    path.write_text("\n\n".join(docs))

    class Chars:  # one id per character: a tokenizer whose output is easy to read back
        bos_id, eos_id, add_bos, add_eos, vocab_size = 0, 1, True, False, 256

        def encode(self, text):
            return [2 + (ord(ch) % 250) for ch in text]

    src = documents.SourceConfig(kind="files", glob=str(path), heldout_fraction=0.25)
    cal = calibrate.calibration_rows([src], Chars(), 300, 32, seed=0)
    assert cal.tokens.shape == (10, 32) and cal.record["tokens"] == 320
    text = "".join(chr(t - 2) if t >= 2 else "|" for t in cal.tokens.reshape(-1))
    held = [int(d.split()[1]) for d in docs[30:]]
    assert not any(f"document {i} " in text for i in held)  # the held-out tail is never used
    for seg, pos, tok in zip(cal.segment_ids, cal.positions, cal.tokens):
        starts = np.flatnonzero(np.diff(seg, prepend=0))
        assert seg[0] == 1 and np.all(pos[starts] == 0) and np.all(tok[starts[1:]] == 0)  # BOS opens each document
        assert np.all(np.diff(pos)[np.diff(seg) == 0] == 1)
    again = calibrate.calibration_rows([src], Chars(), 300, 32, seed=0)
    assert again.record["sha256"] == cal.record["sha256"]
    assert calibrate.calibration_rows([src], Chars(), 300, 32, seed=1).record["sha256"] != cal.record["sha256"]
    with pytest.raises(ValueError, match="fewer than"):
        calibrate.calibration_rows([src], Chars(), 10**6, 32)


def test_asvd_needs_moments_and_checks_their_shape(tmp_path):
    base, params = load(llama_hf(layers=4), tmp_path)
    rec = convert.Recursion(loops=2, rank_attn=4, rank_mlp=4)
    assert rec.lora_init == "asvd" and rec.needs_calibration
    with pytest.raises(ValueError, match="needs calibration moments"):
        convert.convert(base, params, rec, progress=False)
    bad = {t: np.zeros((4, 3, 3)) for t in model_lib.TAPS}
    with pytest.raises(ValueError, match="calibration moments"):
        convert.convert(base, params, rec, progress=False, moments=bad)
    tokens = np.full((1, 8), VOCAB + 5)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        calibrate.collect_moments(base, params, calibration_of(tokens), progress=False)


def test_cli_asvd_records_its_calibration_and_beats_svd(tmp_path):
    """rrt.convert --lora_init asvd on a text file: the record (sources, rows, hash) is in the metadata, rerunning
    the same command is a no-op, and on the calibration text the converted model is closer to the original."""
    from rrt import formats
    from rrt.formats import tokenizer as tokenizer_lib

    m = llama_hf(layers=4)
    src = tmp_path / "hf"
    m.save_pretrained(src)

    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = "\n\n".join(f"story {i}: the cat sat on mat number {i * 7 % 13} and then it ran away" for i in range(200))
    backend.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False)
    )
    tokenizer_lib.Tokenizer(backend, 0, 1, add_bos=True, add_eos=False).save(str(src))
    corpus = tmp_path / "calib.txt"
    corpus.write_text(text)
    outs, argv = {}, {}
    for lora_init in ("asvd", "svd"):
        out = tmp_path / lora_init
        args = ["--source", str(src), "--out", str(out), "--loops", "2", "--rank", "3", "--lora_init", lora_init]
        argv[lora_init] = args + ["--calib_data", str(corpus), "--calib_tokens", "512", "--calib_seq_len", "64"]
        assert convert.main(argv[lora_init]) == 0
        outs[lora_init] = formats.load(str(out))
    meta = json.loads((tmp_path / "asvd" / "rrt_model.json").read_text())["conversion"]
    assert meta["recursion"]["lora_init"] == "asvd" and meta["calibration"]["tokens"] == 512
    assert meta["calibration"]["sources"][0]["glob"] == str(corpus) and len(meta["calibration"]["sha256"]) == 64
    assert "calibration" not in json.loads((tmp_path / "svd" / "rrt_model.json").read_text())["conversion"]
    assert convert.main(argv["asvd"]) == 0  # the same conversion again: nothing to do
    with pytest.raises(FileExistsError, match="different checkpoint"):  # other calibration: another conversion
        convert.main(argv["asvd"][:-3] + ["256"] + argv["asvd"][-2:])
    tok = tokenizer_lib.load_tokenizer(str(src))
    ids = np.asarray(tok.encode(text)[:256]).reshape(4, 64)
    with torch.no_grad():
        ref = m(torch.tensor(ids)).logits.numpy()
    errs = {k: np.linalg.norm(np.asarray(model_lib.from_params(*v)(ids)) - ref) for k, v in outs.items()}
    assert errs["asvd"] < errs["svd"], errs
