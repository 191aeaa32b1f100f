"""rrt.flops.forward_flops_per_token against the count written out by hand: projections (LoRA included), attention
over seq_len keys at a global position and min(seq_len, sliding_window) at a local one, the head per applied exit."""

import pytest

from rrt import flops, model

D, N, KV, H, FF, V = 64, 4, 2, 32, 128, 256  # head_dim * heads != d_model, as in Gemma 2


def by_hand(n_layers, local, seq, window, rank_attn=0, rank_mlp=0, heads_applied=1):
    """2 FLOPs per multiply-add of every matmul; `local` [L] says which depth positions attend within `window`."""
    attn = D * N * H + 2 * D * KV * H + N * H * D  # q, k, v, o
    mlp = 3 * D * FF  # gate, up, down
    lora = rank_attn * ((D + N * H) + 2 * (D + KV * H) + (N * H + D)) + rank_mlp * 3 * (D + FF)
    total = n_layers * (attn + mlp + lora)
    for is_local in local:
        keys = min(seq, window) if is_local else seq
        total += 2 * keys * N * H  # q.k and p.v: no causal halving
    return 2.0 * (total + heads_applied * D * V)


def config(**kw):
    return model.ModelConfig(vocab_size=V, d_model=D, n_heads=N, n_kv_heads=KV, head_dim=H, d_ff=FF, **kw)


@pytest.mark.parametrize("seq", [8, 16, 100, 4096])
def test_gemma2_like_alternating_local_global(seq):
    kinds = ("sliding_attention", "full_attention") * 3
    cfg = config(
        family="gemma2", n_layers=6, act="gelu_tanh", norm_position="sandwich", sliding_window=16, layer_types=kinds
    )
    assert cfg.local_positions().tolist() == [True, False] * 3
    assert flops.forward_flops_per_token(cfg, seq) == by_hand(6, [True, False] * 3, seq, 16)
    # recursive with LoRA: the kind stays with the depth position
    rec = config(family="gemma2", n_layers=6, n_loops=2, rank_attn=8, rank_mlp=4, sliding_window=16, layer_types=kinds)
    want = by_hand(6, [True, False] * 3, seq, 16, rank_attn=8, rank_mlp=4, heads_applied=2)
    assert flops.forward_flops_per_token(rec, seq, heads_applied=2) == want
    assert flops.train_flops_per_token(rec, seq, 2) == 3 * want


@pytest.mark.parametrize("seq", [8, 4096, 5000])
def test_mistral_like_all_local(seq):
    cfg = config(family="mistral", n_layers=4, sliding_window=4096)  # no layer_types: every position is local
    assert cfg.local_positions().all()
    assert flops.forward_flops_per_token(cfg, seq) == by_hand(4, [True] * 4, seq, 4096)
    if seq > 4096:  # the window caps the keys: fewer FLOPs than the same model without it
        assert flops.forward_flops_per_token(cfg, seq) < flops.forward_flops_per_token(config(n_layers=4), seq)


def test_global_only_unchanged():
    cfg = config(n_layers=4)
    assert flops.forward_flops_per_token(cfg, 1000) == by_hand(4, [False] * 4, 1000, 0)
