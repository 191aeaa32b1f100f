"""Recursive and relaxed recursive models against transformers (the independent reference).

* Full-rank relaxed models reproduce the original (an HF model) for every family, both strategies, every init.
* Any relaxed or strict recursive model equals an HF model whose layer l holds position l's merged weights
  W' + s * a_l b_l (the "plain loop over positions" reference, computed by transformers, not by rrt).
* B = 1, rank 0 is the original; zero-init LoRA is the strict recursive model; the HLO does not grow with B.
"""

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_parity_test import randomize, rel_error

from rrt import calibrate, convert, formats, lora
from rrt import model as model_lib

VOCAB, BATCH, TIME = 256, 2, 48


def ids():
    return np.random.default_rng(0).integers(0, VOCAB, (BATCH, TIME))


def llama_hf(layers=6):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        rope_theta=5000.0,
        tie_word_embeddings=False,
    )
    return randomize(transformers.LlamaForCausalLM(cfg), norm_center=1.0)


def gemma_hf(layers=4):
    cfg = transformers.GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
    )
    return randomize(transformers.GemmaForCausalLM(cfg), norm_center=0.0)


WINDOW = 16  # shorter than the rows (TIME), so that local attention differs from global


def mistral_hf(layers=4):
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=WINDOW,
    )
    return randomize(transformers.MistralForCausalLM(cfg), norm_center=1.0)


GEMMA_SHAPES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=WINDOW,
    query_pre_attn_scalar=24,
    attn_implementation="eager",
)


def gemma2_hf(layers=4):
    cfg = transformers.Gemma2Config(
        **GEMMA_SHAPES, num_hidden_layers=layers, attn_logit_softcapping=5.0, final_logit_softcapping=3.0
    )
    return randomize(transformers.Gemma2ForCausalLM(cfg), norm_center=0.0)


def gemma3_hf(layers=4):
    # Global position 2 runs shared layer 0 (local at position 0) under cycle, layer 1 (local at 3) under sequence.
    cfg = transformers.Gemma3TextConfig(
        **GEMMA_SHAPES,
        num_hidden_layers=layers,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"][:layers],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
        },
    )
    return randomize(transformers.Gemma3ForCausalLM(cfg), norm_center=0.0)


def neox_hf(layers=4):
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        rotary_pct=0.25,
        use_parallel_residual=True,
    )
    return randomize(transformers.GPTNeoXForCausalLM(cfg), norm_center=1.0)


def qwen3_hf(layers=4):
    """Per-head qk-norm weights: vector parameters kept per position like the other norms."""
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
    )
    return randomize(transformers.Qwen3ForCausalLM(cfg), norm_center=1.0)


def olmo2_hf(layers=4):
    cfg = transformers.Olmo2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return randomize(transformers.Olmo2ForCausalLM(cfg), norm_center=1.0)


def hf_logits(m) -> np.ndarray:
    with torch.no_grad():
        return m(torch.tensor(ids())).logits.numpy()


def rrt_logits(cfg, params) -> np.ndarray:
    return np.asarray(model_lib.from_params(cfg, params)(jnp.asarray(ids())))


def calibration_of(tokens_BxT) -> calibrate.Calibration:
    """Calibration rows of one document each (what transformers computes too: no segment ids)."""
    b, t = tokens_BxT.shape
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return calibrate.Calibration(np.asarray(tokens_BxT, np.int32), np.ones((b, t), np.int32), pos, {})


def load(m, tmp_path):
    m.save_pretrained(tmp_path)
    return formats.load(str(tmp_path))


@pytest.mark.parametrize(
    "make",
    [
        llama_hf,
        pytest.param(gemma_hf, marks=pytest.mark.slow),  # Gemma's norms and scaling: gemma2 below, in the default run
        pytest.param(neox_hf, marks=pytest.mark.slow),  # parallel residual: families_test parity and export
        pytest.param(qwen3_hf, marks=pytest.mark.slow),  # qk-norm per head: also in families_test parity / export
        pytest.param(olmo2_hf, marks=pytest.mark.slow),
        gemma2_hf,  # alternating local/global (Gemma 3's two RoPE bases: families_test's export, and here slow)
        pytest.param(gemma3_hf, marks=pytest.mark.slow),  # default run under 20 min
        pytest.param(mistral_hf, marks=pytest.mark.slow),
    ],
    ids=["llama", "gemma", "neox", "qwen3", "olmo2", "gemma2", "gemma3", "mistral"],
)
def test_full_rank_relaxed_equals_original(make, tmp_path):
    m = make()
    ref = hf_logits(m)
    base, params = load(m, tmp_path)
    full_attn, full_mlp = convert.full_rank(base)
    moments = calibrate.collect_moments(base, params, calibration_of(ids()), progress=False)
    # every init with svd; asvd (whose shared weights come from the same inits) with two of them, to keep it short
    combos = list(itertools.product(model_lib.STRATEGIES, convert.INITS, ("svd",)))
    combos += list(itertools.product(model_lib.STRATEGIES, ("average", "random"), ("asvd",)))
    for strategy, init, lora_init in combos:
        rec = convert.Recursion(
            loops=2,
            strategy=strategy,
            init=init,
            rank_attn=full_attn,
            rank_mlp=full_mlp,
            alpha=3.0,
            lora_init=lora_init,
        )
        cfg, new, report = convert.convert(base, params, rec, progress=False, moments=moments)
        assert cfg.n_shared == base.n_layers // 2 and cfg.per_position_norms
        assert cfg.lora_scale("q") != 1.0  # alpha differs from r
        err = rel_error(rrt_logits(cfg, new), ref)
        assert err < 1e-5, (strategy, init, lora_init, err)
        assert all(abs(v - 1) < 1e-9 for v in report["kept_energy"].values())


def test_one_loop_rank_zero_is_the_original(tmp_path):
    m = llama_hf()
    base, params = load(m, tmp_path)
    cfg, new, _ = convert.convert(base, params, convert.Recursion(loops=1, init="lower"), progress=False)
    assert cfg.n_shared == cfg.n_layers and not cfg.relaxed
    assert rel_error(rrt_logits(cfg, new), hf_logits(m)) < 1e-5


def merged_llama_state_dict(cfg: model_lib.ModelConfig, params: dict) -> dict:
    """Position l's merged weights W' + s a_l b_l as an ordinary full-depth HF Llama/Gemma state dict."""
    ids_l = cfg.layer_ids().reshape(-1)
    sd = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = params["head"].T
    hf_names = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    for l in range(cfg.n_layers):
        for proj, hf in hf_names.items():
            w = params[f"layers/{proj}"][ids_l[l]]
            if f"relax/{proj}_a" in params:
                w = np.asarray(
                    lora.merge(w, params[f"relax/{proj}_a"][l], params[f"relax/{proj}_b"][l], cfg.lora_scale(proj))
                )
            sd[f"model.layers.{l}.{hf}.weight"] = w.T
        for ours, hf in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
            vec = params[f"relax/{ours}"][l] if cfg.per_position_norms else params[f"layers/{ours}"][ids_l[l]]
            sd[f"model.layers.{l}.{hf}.weight"] = vec
    return {k: torch.tensor(np.asarray(v, np.float32)) for k, v in sd.items()}


@pytest.mark.parametrize("make", [llama_hf, gemma_hf], ids=["llama", "gemma"])
@pytest.mark.parametrize("strategy", model_lib.STRATEGIES)
@pytest.mark.parametrize("rank", [0, 4])
def test_scanned_stack_equals_loop_over_merged_positions(make, strategy, rank, tmp_path):
    m = make()
    base, params = load(m, tmp_path)
    rec = convert.Recursion(
        loops=2,
        strategy=strategy,
        init="average",
        rank_attn=rank,
        rank_mlp=rank + 2,
        alpha=5.0,
        lora_init="svd",
    )
    cfg, new, _ = convert.convert(base, params, rec, progress=False)
    # perturb the LoRA factors so that they matter beyond their SVD init
    rng = np.random.default_rng(1)
    new = {
        k: v + (0.05 * rng.standard_normal(v.shape).astype(np.float32) if k.startswith("relax/") else 0)
        for k, v in new.items()
    }
    reference = type(m)(m.config)
    reference.load_state_dict(merged_llama_state_dict(cfg, new), strict=False)
    assert rel_error(rrt_logits(cfg, new), hf_logits(reference.eval())) < 1e-5


def test_expand_gives_the_same_function_at_full_depth(tmp_path):
    base, params = load(neox_hf(), tmp_path)
    rec = convert.Recursion(
        loops=2, strategy="sequence", init="average", rank_attn=4, rank_mlp=6, alpha=2.0, lora_init="svd"
    )
    cfg, new, _ = convert.convert(base, params, rec, progress=False)
    full_cfg, full = convert.expand(cfg, new)
    assert full_cfg.n_loops == 1 and not full_cfg.relaxed and full_cfg.n_layers == cfg.n_layers
    assert rel_error(rrt_logits(full_cfg, full), rrt_logits(cfg, new)) < 1e-5


def test_zero_init_lora_equals_strict_recursion(tmp_path):
    base, params = load(llama_hf(), tmp_path)
    strict_cfg, strict, _ = convert.convert(base, params, convert.Recursion(loops=3, init="stepwise"), progress=False)
    rec = convert.Recursion(
        loops=3, init="stepwise", rank_attn=8, rank_mlp=8, lora_init="zero", per_position_norms=False
    )
    cfg, relaxed, report = convert.convert(base, params, rec, progress=False)
    assert np.all(relaxed["relax/q_b"] == 0) and np.any(relaxed["relax/q_a"] != 0)
    assert rel_error(rrt_logits(cfg, relaxed), rrt_logits(strict_cfg, strict)) < 1e-6


def test_zero_init_lora_is_the_same_function_at_every_rank(tmp_path):
    """experiments/reproduce/driver.py evaluates the zero-init variants' converted model once for all ranks."""
    base, params = load(llama_hf(), tmp_path)
    logits = []
    for rank in (2, 8):
        rec = convert.Recursion(loops=3, init="average", rank_attn=rank, rank_mlp=rank, lora_init="zero")
        cfg, relaxed, _ = convert.convert(base, params, rec, progress=False)
        logits.append(rrt_logits(cfg, relaxed))
    assert rel_error(logits[0], logits[1]) < 1e-6


def test_init_source_layers():
    cfg = dataclasses.replace(
        model_lib.ModelConfig(vocab_size=8, d_model=8, n_layers=30, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8),
        n_loops=2,
    )
    assert convert.source_layers(cfg, "stepwise")[:4] == [[0], [2], [4], [6]]
    assert convert.source_layers(cfg, "stepwise")[-1] == [29]
    assert convert.source_layers(cfg, "average")[3] == [3, 18]  # cycle: slot k serves positions k and k + K
    assert convert.source_layers(cfg, "lower")[3] == [3] and convert.source_layers(cfg, "upper")[0] == [15]
    seq = dataclasses.replace(cfg, strategy="sequence")
    assert convert.source_layers(seq, "average")[3] == [6, 7]  # sequence: slot k serves 2k, 2k + 1
    assert seq.layer_ids().reshape(-1)[:4].tolist() == [0, 0, 1, 1]
    assert cfg.layer_ids().reshape(-1)[14:17].tolist() == [14, 0, 1]


def test_hlo_size_does_not_grow_with_loops():
    def hlo(loops):
        cfg = model_lib.ModelConfig(
            vocab_size=64,
            d_model=32,
            n_layers=4 * loops,
            n_heads=4,
            n_kv_heads=2,
            head_dim=8,
            d_ff=64,
            n_loops=loops,
            rank_attn=4,
            rank_mlp=4,
            per_position_norms=True,
        )
        graphdef, state = nnx.split(model_lib.abstract(cfg))
        fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
        return fn.lower(state, jax.ShapeDtypeStruct((2, 16), jnp.int32)).as_text()

    small, large = len(hlo(2)), len(hlo(8))
    assert abs(large - small) / small < 0.10, (small, large)


def test_conversion_errors(tmp_path):
    base, params = load(llama_hf(layers=6), tmp_path)
    with pytest.raises(ValueError, match="cannot be split into 4 loops"):
        convert.recursive_config(base, convert.Recursion(loops=4))
    with pytest.raises(ValueError, match="unknown init"):
        convert.recursive_config(base, convert.Recursion(init="middle"))
    with pytest.raises(ValueError, match="unknown strategy"):
        convert.recursive_config(base, convert.Recursion(strategy="zigzag"))
    with pytest.raises(ValueError, match="rank_attn=49"):
        convert.recursive_config(base, convert.Recursion(rank_attn=49))


def test_cli_writes_loads_and_refuses_to_overwrite(tmp_path, capsys):
    from rrt.formats import gguf, tokenizer

    m = llama_hf(layers=4)
    src = tmp_path / "hf"
    m.save_pretrained(src)
    tokenizer.load_tokenizer(gguf.smollm2_gguf_path()).save(str(src))  # any real tokenizer for the directory
    out = tmp_path / "rec"
    # SmolLM2's tokenizer outgrows this model's 256 ids: asvd calibration would refuse its tokens (lora_init_test)
    args = ["--source", str(src), "--out", str(out), "--loops", "2", "--rank", "full", "--lora_init", "svd"]
    args += ["--alpha", "2"]
    assert convert.main(args) == 0
    printed = capsys.readouterr().out
    assert "LoRA" in printed and "kept" in printed
    cfg, params = formats.load(str(out))
    assert cfg.n_loops == 2 and cfg.rank_attn == 48
    assert rel_error(rrt_logits(cfg, params), hf_logits(m)) < 1e-5
    assert json.loads((out / "rrt_model.json").read_text())["conversion"]["recursion"]["loops"] == 2
    assert convert.main(args) == 0  # the same conversion again: nothing to do
    with pytest.raises(FileExistsError, match="different checkpoint"):
        convert.main(args[:-2] + ["--alpha", "3"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("data")
    with pytest.raises(FileExistsError, match="not empty"):
        convert.main(["--source", str(src), "--out", str(tmp_path / "busy"), "--loops", "2"])
    with pytest.raises(ValueError, match="above min"):
        convert.main(["--source", str(src), "--out", str(tmp_path / "r2"), "--loops", "2", "--rank", "4096"])


def test_cli_source_smollm2_names_the_packaged_model_for_weights_and_tokenizer(tmp_path, monkeypatch):
    """`--source smollm2` (as the README shows) resolves to the packaged model for the weights AND the tokenizer;
    here the packaged path is pointed at a small HF directory so the test stays fast."""
    from rrt.formats import gguf, tokenizer

    src = tmp_path / "hf"
    llama_hf(layers=2).save_pretrained(src)
    tokenizer.load_tokenizer(gguf.smollm2_gguf_path()).save(str(src))
    monkeypatch.setattr(gguf, "smollm2_gguf_path", lambda: str(src))
    out = tmp_path / "rec"
    assert convert.main(["--source", "smollm2", "--out", str(out), "--loops", "2"]) == 0
    meta = json.loads((out / "rrt_model.json").read_text())
    assert meta["conversion"]["source"] == str(src)
    assert formats.load(str(out))[0].n_loops == 2
    assert formats.load_tokenizer(str(out)).vocab_size == formats.load_tokenizer(str(src)).vocab_size


def test_convert_cli_bad_out_and_negative_rank_say_what_is_wrong(tmp_path, capsys):
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"data")
    with pytest.raises(SystemExit):
        convert.parse_args(["--source", "x", "--out", str(a_file), "--loops", "2"])
    assert f"--out {a_file} is an existing file, not a directory" in capsys.readouterr().err
    assert a_file.read_bytes() == b"data"
    for flag in ("--rank", "--rank_mlp"):
        with pytest.raises(SystemExit):
            convert.parse_args(["--source", "x", "--out", str(tmp_path / "o"), "--loops", "2", flag, "-3"])
        assert "rank must be >= 0 (0: strict recursion) or 'full', got -3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.parse_args(["--source", "x", "--out", str(tmp_path / "o"), "--loops", "0"])
    assert "--loops must be >= 1, got 0" in capsys.readouterr().err
    base = model_lib.ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
    args = convert.parse_args(["--source", "x", "--out", str(tmp_path / "o"), "--loops", "2"])
    args.rank = -1  # e.g. from a caller building the namespace itself
    with pytest.raises(ValueError, match="--rank=-1 is negative"):
        convert.recursion_from_args(base, args)
