"""rrt.data and rrt.data.tfds: packing invariants, the model honouring segments, resume == uninterrupted on 1 and 2
hosts, host shards and epoch reshuffles, mixtures, the token cache, TFDS round trip, clear errors. SmolLM2's real
tokenizer throughout (loaded once)."""

import dataclasses
import json
import os
import subprocess
import sys

import grain
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from rrt import model
from rrt.data import documents, ordering, pipeline
from rrt.data import tfds as text_tfds
from rrt.formats import gguf, tokenizer

CORPORA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "corpora")
TINYSTORIES = os.path.join(CORPORA, "tinystories_val.txt")
SHAKESPEARE = os.path.join(CORPORA, "tinyshakespeare.txt")
N_DOCS = 40
DOC_TOKENS = 8  # BOS + "doc 0012" (6 tokens: digits split) + EOS
ROW_DOCS = 3  # seq_len = 3 * 7 pairs: rows hold whole documents


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer(gguf.smollm2_gguf_path())


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """N_DOCS documents "doc 0000" ..., blank-line separated; each is DOC_TOKENS tokens with BOS and EOS."""
    path = tmp_path_factory.mktemp("numbered") / "docs.txt"
    path.write_text("\n\n".join(f"doc {i:04d}" for i in range(N_DOCS)) + "\n")
    return str(path)


def config(*sources, **kw) -> pipeline.DataConfig:
    kw = {"seq_len": ROW_DOCS * (DOC_TOKENS - 1), "global_batch_size": 2, "add_bos": True, "add_eos": True, **kw}
    return pipeline.DataConfig(sources=sources, **kw)


def files(glob, **kw) -> documents.SourceConfig:
    return documents.SourceConfig("files", glob=glob, **kw)


def pieces(batch) -> list[np.ndarray]:
    """The token sequence of every segment in a batch: its inputs plus its last target."""
    out = []
    for inputs, targets, seg in zip(batch["inputs"], batch["targets"], batch["segment_ids"]):
        for s in range(1, seg.max() + 1):
            m = seg == s
            out.append(np.append(inputs[m], targets[m][-1]))
    return out


def doc_ids(it, n_batches: int, tok) -> list[int]:
    """Which numbered documents an iterator yields, in order (rows hold whole documents)."""
    ids = {tuple([tok.bos_id] + tok.encode(f"doc {i:04d}") + [tok.eos_id]): i for i in range(N_DOCS)}
    return [ids[tuple(p)] for _ in range(n_batches) for p in pieces(next(it))]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_packing_invariants(tok):
    """Rows of seq_len; segments 1.. then padding 0; positions restart per segment; targets are the next token of the
    same document; concatenated pieces give back every document (BOS/EOS as the tokenizer says: none for SmolLM2)."""
    assert not tok.add_bos and not tok.add_eos
    cfg = config(files(TINYSTORIES), seq_len=96, global_batch_size=4, shuffle=False, add_bos=None, add_eos=None)
    it = pipeline.make_iterator(cfg, tok, process_index=0, process_count=1)
    inputs, targets = [], []
    for _ in range(6):
        b = next(it)
        assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
            "inputs": ((4, 96), "int32"),
            "targets": ((4, 96), "int32"),
            "segment_ids": ((4, 96), "int32"),
            "positions": ((4, 96), "int32"),
            "loss_mask": ((4, 96), "float32"),
        }
        np.testing.assert_array_equal(b["loss_mask"], b["segment_ids"] > 0)
        for seg, pos in zip(b["segment_ids"], b["positions"]):
            starts = np.flatnonzero(np.diff(seg, prepend=0))
            assert list(seg[starts]) == list(range(1, len(starts) + 1))
            for s in range(1, seg.max() + 1):
                np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
        inputs.append(b["inputs"].ravel())
        targets.append(b["targets"].ravel())
    # The (input, target) pairs of the documents, in order (a split document continues in the next row).
    docs = [tok.encode(d) for d in documents.read_documents(TINYSTORIES)[:200]]
    inputs, targets = np.concatenate(inputs), np.concatenate(targets)
    np.testing.assert_array_equal(inputs, np.concatenate([d[:-1] for d in docs])[: len(inputs)])
    np.testing.assert_array_equal(targets, np.concatenate([d[1:] for d in docs])[: len(targets)])


def test_bos_eos_override(tok, numbered):
    b = next(pipeline.make_iterator(config(files(numbered), shuffle=False), tok, process_index=0, process_count=1))
    first = pieces(b)[0]
    assert first[0] == tok.bos_id and first[-1] == tok.eos_id
    assert list(first[1:-1]) == tok.encode("doc 0000")
    no_eos = config(files(numbered), shuffle=False, add_eos=False, seq_len=6 * ROW_DOCS)
    assert pieces(next(pipeline.make_iterator(no_eos, tok, process_index=0, process_count=1)))[0][-1] != tok.eos_id


def test_model_honours_segments(tok):
    """Each document of a packed row gets the logits it gets alone."""
    cfg = pipeline.DataConfig(sources=(files(TINYSTORIES),), seq_len=128, global_batch_size=1, seed=3)
    b = next(pipeline.make_iterator(cfg, tok, process_index=0, process_count=1))
    assert b["segment_ids"].max() >= 3
    v = 512  # a small vocabulary keeps this fast: ids are folded into it, segments are what is tested
    mcfg = model.ModelConfig(vocab_size=v, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
    m = model.Decoder(mcfg, rngs=nnx.Rngs(0))
    inputs = jnp.asarray(b["inputs"] % v)
    packed = m(inputs, jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"]))[0]
    # Each document alone, at the start of its own row (what follows it cannot change causal logits): one call.
    seg = b["segment_ids"][0]
    alone_SxT = jnp.stack([jnp.roll(inputs[0], -int(np.argmax(seg == s))) for s in range(1, seg.max() + 1)])
    alone = m(alone_SxT)
    for s in range(1, seg.max() + 1):
        n = int((seg == s).sum())
        np.testing.assert_allclose(packed[seg == s], alone[s - 1, :n], rtol=1e-5, atol=1e-5)
    leaky = m(inputs, jnp.asarray(b["positions"]))[0]  # without segment ids later documents see earlier ones
    assert float(jnp.abs(leaky - packed)[seg > 1].max()) > 1e-3


@pytest.mark.parametrize("hosts", [1, 2])
def test_resume_equals_uninterrupted(tok, numbered, hosts):
    """State after N batches (through JSON), restored into a fresh iterator: the same next batches, across epoch
    wraps (each host's epoch here is under 4 batches)."""
    cfg = config(files(numbered), seed=7, global_batch_size=2 * hosts)
    for host in range(hosts):
        it = pipeline.make_iterator(cfg, tok, process_index=host, process_count=hosts)
        for _ in range(3):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(6)]
        resumed = pipeline.make_iterator(cfg, tok, process_index=host, process_count=hosts)
        resumed.set_state(state)
        for e in expected:
            assert_batches_equal(next(resumed), e)
    # Mid-document state: rows that split documents.
    cfg = config(files(TINYSTORIES), seq_len=50, global_batch_size=2 * hosts)
    it = pipeline.make_iterator(cfg, tok, process_index=hosts - 1, process_count=hosts)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["grain"]["offset"] > 0
    expected = [next(it) for _ in range(3)]
    resumed = pipeline.make_iterator(cfg, tok, process_index=hosts - 1, process_count=hosts)
    resumed.set_state(state)
    for e in expected:
        assert_batches_equal(next(resumed), e)


def test_hosts_shard_and_epochs_reshuffle(tok, numbered):
    """Two hosts read disjoint halves of each epoch's global order; each epoch is a fresh permutation; the seed
    decides it."""
    cfg = config(files(numbered), seed=1, global_batch_size=4)
    per_epoch = N_DOCS // 2
    streams = [doc_ids(pipeline.make_iterator(cfg, tok, process_index=h, process_count=2), 10, tok) for h in range(2)]
    epochs = [
        sorted(streams[0][e * per_epoch : (e + 1) * per_epoch] + streams[1][e * per_epoch : (e + 1) * per_epoch])
        for e in range(2)
    ]
    assert epochs[0] == epochs[1] == list(range(N_DOCS))
    assert not set(streams[0][:per_epoch]) & set(streams[1][:per_epoch])
    one = doc_ids(pipeline.make_iterator(cfg, tok, process_index=0, process_count=1), 14, tok)
    assert sorted(one[:N_DOCS]) == sorted(one[N_DOCS : 2 * N_DOCS]) == list(range(N_DOCS))
    assert one[:N_DOCS] != one[N_DOCS : 2 * N_DOCS] and one[:N_DOCS] != list(range(N_DOCS))
    assert one[0::2][:per_epoch] == streams[0][:per_epoch]  # host h reads global positions h, h + 2, ...
    again = doc_ids(pipeline.make_iterator(cfg, tok, process_index=0, process_count=1), 3, tok)
    other = doc_ids(
        pipeline.make_iterator(config(files(numbered), seed=2), tok, process_index=0, process_count=1), 3, tok
    )
    assert again == one[: len(again)] and other != again


def test_order(monkeypatch):
    """The global order: 0.7/0.3 weights draw 7:3 in every period of 10; each source's epochs are fresh
    permutations; above PERMUTATION_MAX_DOCS documents, the order is exactly grain's shuffle + repeat."""
    order = ordering.Order([13, 1], [0.7, 0.3], seed=4, shuffle=True)
    src, doc = order(np.arange(1000))
    assert all(np.bincount(src[i : i + 10]).tolist() == [7, 3] for i in range(0, 1000, 10))
    assert (doc[src == 1] == 0).all()
    epochs = doc[src == 0][: 13 * 5].reshape(5, 13)
    assert all(sorted(e) == list(range(13)) for e in epochs) and len({tuple(e) for e in epochs}) == 5
    np.testing.assert_array_equal(order(np.arange(500, 600))[1], doc[500:600])
    monkeypatch.setattr(ordering, "PERMUTATION_MAX_DOCS", 0)
    n = 100_000
    order = ordering.Order([n], [1.0], seed=4, shuffle=True)
    grain_ds = grain.MapDataset.range(n).shuffle(seed=order.seeds[0]).repeat()
    positions = np.concatenate([np.arange(300), n + np.arange(300)])  # epochs 0 and 1
    np.testing.assert_array_equal(order(positions)[1], [grain_ds[int(p)] for p in positions])


def test_mixture(tok, numbered, tmp_path):
    """A .txt and a .jsonl source mixed 3:1 by a deterministic weighted interleave."""
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"body": f"doc {i:04d}", "id": i}) + "\n" for i in range(N_DOCS // 2, N_DOCS)))
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(f"doc {i:04d}" for i in range(N_DOCS // 2)))
    cfg = config(files(str(txt), weight=3.0), files(str(jsonl), text_field="body", weight=1.0))
    ids = doc_ids(pipeline.make_iterator(cfg, tok, process_index=0, process_count=1), 8, tok)
    from_jsonl = sum(i >= N_DOCS // 2 for i in ids)
    assert len(ids) == 48 and from_jsonl == 12


def test_token_cache(tok, numbered, tmp_path):
    """Warm (cached) batches equal cold ones; the cache is reused, and keyed by tokenizer settings."""
    cold = next(pipeline.make_iterator(config(files(TINYSTORIES)), tok, process_index=0, process_count=1))
    cache = str(tmp_path / "cache")
    cfg = config(files(TINYSTORIES), cache_dir=cache)
    assert_batches_equal(next(pipeline.make_iterator(cfg, tok, process_index=0, process_count=1)), cold)
    files_before = {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)}
    assert len(files_before) == 2
    assert_batches_equal(next(pipeline.make_iterator(cfg, tok, process_index=0, process_count=1)), cold)
    assert {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)} == files_before
    pipeline.make_iterator(
        config(files(TINYSTORIES), cache_dir=cache, add_bos=False), tok, process_index=0, process_count=1
    )
    assert len(os.listdir(cache)) == 4


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """tinystories_val prepared by the CLI entry point, 10% held out."""
    d = str(tmp_path_factory.mktemp("tfds"))
    text_tfds.run(["--input", TINYSTORIES, "--name", "tinystories_val", "--data_dir", d, "--heldout_fraction", "0.1"])
    return d


def test_tfds_round_trip(tok, tfds_dir, tmp_path):
    """Read back through tfds.data_source (as a pod job does): the documents of the files source, split for split,
    and the same batches from the pipeline; cached only when asked."""
    docs = documents.read_documents(TINYSTORIES)
    train, held = documents.split_documents(docs, 0.1)
    assert len(held) == -(-len(docs) // 10) and train + held == docs
    for split, want in (("train", train), ("validation", held)):
        src = tfds.data_source("tinystories_val", split=split, data_dir=tfds_dir)
        assert len(src) == len(want)
        assert [src[i]["text"].decode() for i in (0, len(want) - 1)] == [want[0], want[-1]]
        via_tfds = config(documents.SourceConfig("tfds", name="tinystories_val", data_dir=tfds_dir, split=split))
        via_files = config(files(TINYSTORIES, heldout_fraction=0.1, split=split))
        a, b = (pipeline.make_iterator(c, tok, process_index=0, process_count=1) for c in (via_tfds, via_files))
        for _ in range(2):
            assert_batches_equal(next(a), next(b))
    src = documents.SourceConfig("tfds", name="tinystories_val", data_dir=tfds_dir)
    cache = tmp_path / "cache"
    lazy = pipeline.make_iterator(config(src, cache_dir=str(cache)), tok, process_index=0, process_count=1)
    assert not cache.exists()
    src = dataclasses.replace(src, cache=True)
    cached = pipeline.make_iterator(config(src, cache_dir=str(cache)), tok, process_index=0, process_count=1)
    assert len(os.listdir(cache)) == 2
    assert_batches_equal(next(lazy), next(cached))


def test_heldout_text():
    """tinyshakespeare: the last 10% of documents, disjoint from the training documents, the file's tail."""
    text = documents.heldout_text(SHAKESPEARE, 0.1)
    docs = documents.read_documents(SHAKESPEARE)
    train, held = documents.split_documents(docs, 0.1)
    assert text == "\n\n".join(held) and len(held) == -(-len(docs) // 10)
    assert open(SHAKESPEARE).read().rstrip().endswith(held[-1])
    assert 0.05 < len(text) / sum(map(len, docs)) < 0.2


def test_doc_separators(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\n\nthree\n")
    (tmp_path / "b.txt").write_text("four\n")
    glob = str(tmp_path / "*.txt")
    assert documents.read_documents(glob) == ["one\ntwo", "three", "four"]
    assert documents.read_documents(glob, doc_separator="line") == ["one", "two", "three", "four"]
    assert documents.read_documents(glob, doc_separator="file") == ["one\ntwo\n\n\nthree", "four"]


def test_errors(tok, numbered, tmp_path, tfds_dir):
    def make(*sources, **kw):
        return pipeline.make_iterator(config(*sources, **kw), tok, process_index=0, process_count=1)

    with pytest.raises(FileNotFoundError, match="matches no file"):
        make(files(str(tmp_path / "nothing*.txt")))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt: empty file"):
        make(files(str(tmp_path / "empty.txt")))
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: no text field 'text' \(has \['body'\]\)"):
        make(files(str(tmp_path / "x.jsonl")))
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n\n{"text": "cut off\n{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:3: not valid JSON \(.*\): '\{\"text\": \"cut off'"):
        make(files(str(tmp_path / "broken.jsonl")))
    with pytest.raises(ValueError, match="has no feature 'body'; it has \\['text'\\]"):
        make(documents.SourceConfig("tfds", name="tinystories_val", data_dir=tfds_dir, text_field="body"))
    with pytest.raises(ValueError, match="smaller than one batch"):
        make(files(numbered), global_batch_size=32)
    with pytest.raises(ValueError, match="another pipeline"):
        make(files(numbered)).set_state(make(files(numbered), seed=5).get_state())
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.make_iterator(config(files(numbered), global_batch_size=3), tok, process_index=0, process_count=2)


def test_to_global():
    """Host-local batches -> batch-sharded global arrays on a 4-device mesh (fake CPU devices, own process)."""
    script = """
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from rrt.data import documents, ordering, pipeline
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
batch = {"inputs": np.arange(32, dtype=np.int32).reshape(8, 4), "loss_mask": np.ones((8, 4), np.float32)}
out = pipeline.to_global(batch, mesh, P("data"))
assert out["inputs"].shape == (8, 4) and out["inputs"].sharding.spec == P("data")
assert len(out["inputs"].addressable_shards) == 4 and out["inputs"].addressable_shards[1].data.shape == (2, 4)
np.testing.assert_array_equal(np.asarray(out["inputs"]), batch["inputs"])
print("ok")
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.slow
def test_workers_resume(tok):
    """grain worker processes: a JSON state restores the same batches (slow: workers spawn and reimport)."""
    cfg = config(files(TINYSTORIES), seq_len=64, num_workers=2)
    it = pipeline.make_iterator(cfg, tok, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    it.close()
    resumed = pipeline.make_iterator(cfg, tok, process_index=0, process_count=1)
    resumed.set_state(state)
    for e in expected:
        assert_batches_equal(next(resumed), e)
    resumed.close()
