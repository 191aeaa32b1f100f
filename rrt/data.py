"""Input pipeline: text sources -> tokens -> packed rows -> per-host batches, resumable.

Batch format (host-local numpy from `Iterator.__next__`; `to_global` turns each into a batch-sharded jax.Array):
  inputs       int32   [B, T]  token ids fed to the model
  targets      int32   [B, T]  the next token of the same document (inputs shifted by one, per document)
  segment_ids  int32   [B, T]  1, 2, ... for the document pieces of a row, 0 on padding
  positions    int32   [B, T]  0, 1, ... within each document piece, 0 on padding
  loss_mask    float32 [B, T]  1 where `targets` is a real next token, 0 on padding
B = global_batch_size // process_count rows on each host, T = seq_len. The model is called as
`model(inputs, positions, segment_ids)`: attention never crosses a segment, so each document in a row gets the
logits it would get alone. Loss: sum(loss_mask * xent(logits, targets)) / sum(loss_mask).

Design notes.
* One grain pipeline: `MapDataset.range(...).map(fetch_block)` -> `to_iter_dataset` (threads) -> packing -> `batch`
  -> optionally worker processes (`mp_prefetch`). An element is a block of BLOCK_DOCS documents, not one document:
  grain's per-element bookkeeping then costs ~1 us per document instead of ~50, and a block is tokenized in one
  `encode_batch` call (which runs in Rust, off the GIL).
* The global order (`_Order`) is a pure function of (config, position): sources are mixed by a deterministic smooth
  weighted round robin; each source runs through epochs, each a fresh permutation seeded by (seed_s + epoch), as
  grain's `shuffle` + `repeat` reseed. Host h takes global positions h, h + P, h + 2P, ... (P = process_count): it
  reads and tokenizes only its own documents. Documents come from a TFDS split read with `tfds.data_source`
  (array_record, no TensorFlow) or from local files read into memory.
* The shift by one happens per document before packing: a document of n tokens (BOS/EOS added as the tokenizer's
  config says, or as `DataConfig` overrides) gives n - 1 (input, target) pairs, so no target crosses a document
  boundary and `loss_mask` is `segment_ids > 0`. Packing concatenates the pairs; a document longer than what is
  left of a row is split, and its continuation starts a new segment at position 0 in the next row (it could not
  attend to its head anyway). Rows are padded only when the stream ends, which an infinite stream never does.
* State: the packer stores grain's state before the block it is in (an element index) plus the document and token
  offset inside it, so the iterator state is a small JSON-able dict, restored exactly (the block is fetched again):
  a restored iterator yields the same batches as an uninterrupted one. It also records a fingerprint of the config,
  the host layout and the tokenizer, and refuses a state from another pipeline. With workers, grain's state holds
  one such dict per worker; the order then depends on num_workers (deterministically).
* Token cache (`cache_dir`): a source tokenized once is stored as a flat token array + document offsets, named by a
  hash of the tokenizer and the source's content (file bytes; TFDS name, version, split), written atomically so
  concurrent hosts may share a directory. Warm runs then read tokens from memory-mapped arrays instead of
  tokenizing. Building it tokenizes the whole source on every host, so by default only "files" sources (local
  corpora) are cached; TFDS sources, possibly huge, tokenize lazily, each host only its own documents
  (`SourceConfig.cache` overrides either way).
"""

import dataclasses
import fractions
import functools
import glob
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from absl import flags
from grain.experimental import index_shuffle

DOC_SEPARATORS = ("blank_line", "line", "file")
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
BLOCK_DOCS = 64  # documents per grain element: grain's per-element cost is paid once per block
PERMUTATION_MAX_DOCS = 1 << 22  # larger sources shuffle without holding a permutation (slower per document)


class Tokenizer(Protocol):
    """What the pipeline uses of a tokenizer (rrt.checkpoints.tokenizer.load_tokenizer returns one)."""

    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One source of documents."""

    kind: str  # "tfds" | "files"
    name: str = ""  # tfds: dataset name, as tfds.data_source takes it ("name", "name:1.0.0", "name/config")
    glob: str = ""  # files: glob(s), comma-separated; .jsonl files hold one JSON record per line, others are text
    data_dir: str | None = None  # tfds: where the prepared dataset lives
    split: str = "train"  # tfds: any split spec ("train[:90%]"); files: "train" or "validation" (the held-out tail)
    text_field: str = "text"  # tfds feature / jsonl field holding the text
    doc_separator: str = "blank_line"  # text files: blank_line | line | file (one document per file)
    heldout_fraction: float = 0.0  # files: the last fraction of documents forms the "validation" split
    weight: float = 1.0  # mixture weight
    cache: bool | None = None  # use DataConfig.cache_dir for this source; None: files sources yes, TFDS no

    def __post_init__(self):
        if self.kind not in ("tfds", "files"):
            raise ValueError(f"SourceConfig: kind must be 'tfds' or 'files', got {self.kind!r}")
        if self.kind == "tfds" and not self.name:
            raise ValueError("SourceConfig: a tfds source needs `name`")
        if self.kind == "files" and not self.glob:
            raise ValueError("SourceConfig: a files source needs `glob`")
        if self.doc_separator not in DOC_SEPARATORS:
            raise ValueError(f"SourceConfig: doc_separator must be one of {DOC_SEPARATORS}, got {self.doc_separator!r}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"SourceConfig: heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.kind == "tfds" and self.heldout_fraction:
            raise ValueError("SourceConfig: heldout_fraction is for files sources; a TFDS source names its split")
        if self.kind == "files" and self.split not in ("train", "validation"):
            raise ValueError(f"SourceConfig: a files source has splits 'train' and 'validation', got {self.split!r}")
        if self.kind == "files" and self.split == "validation" and not self.heldout_fraction:
            raise ValueError("SourceConfig: split='validation' of a files source needs heldout_fraction > 0")
        if not self.weight > 0:
            raise ValueError(f"SourceConfig: weight must be positive, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The whole pipeline. Library code takes this; entry points build it from their ConfigDict."""

    sources: tuple[SourceConfig, ...]
    seq_len: int  # T
    global_batch_size: int  # rows per step over all hosts
    seed: int = 0
    shuffle: bool = True  # global document shuffle, fresh each epoch
    add_bos: bool | None = None  # None: as the tokenizer's config says
    add_eos: bool | None = None
    cache_dir: str | None = None  # on-disk token cache; None: tokenize on the fly
    num_threads: int = 1  # threads fetching (reading, tokenizing) blocks ahead of the packer
    prefetch: int = 4  # blocks of documents read ahead by those threads
    num_workers: int = 0  # grain worker processes (0: in this process); changes the order, deterministically

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources:
            raise ValueError("DataConfig: no sources")
        for name in ("seq_len", "global_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DataConfig: {name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"DataConfig: seed must be in [0, 2**32), got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Documents.


def _paths(pattern: str) -> list[str]:
    paths = sorted(
        {p for part in pattern.split(",") for p in glob.glob(os.path.expanduser(part.strip()), recursive=True)}
    )
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise FileNotFoundError(f"glob {pattern!r} matches no file")
    return paths


def _read_file(path: str, doc_separator: str, text_field: str) -> list[str]:
    if path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or text_field not in record:
                    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{path}:{line_no}: no text field {text_field!r} (has {fields})")
                if not isinstance(record[text_field], str):
                    raise ValueError(f"{path}:{line_no}: field {text_field!r} is not a string")
                if record[text_field].strip():
                    docs.append(record[text_field])
        return docs
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if doc_separator == "file":
        return [text.strip()] if text.strip() else []
    pieces = text.splitlines() if doc_separator == "line" else re.split(r"\n[ \t]*\n", text)
    return [d.strip() for d in pieces if d.strip()]


def read_documents(pattern: str, *, doc_separator: str = "blank_line", text_field: str = "text") -> list[str]:
    """All documents of the files matching `pattern`, files in sorted order. An empty file is an error."""
    docs = []
    for path in _paths(pattern):
        file_docs = _read_file(path, doc_separator, text_field)
        if not file_docs:
            raise ValueError(f"{path}: empty file (no documents)")
        docs += file_docs
    return docs


def split_documents(docs: Sequence[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out): the held-out part is the last ceil(fraction * n) documents."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    n_held = math.ceil(len(docs) * heldout_fraction)
    if n_held and n_held >= len(docs):
        raise ValueError(f"cannot hold out {heldout_fraction:.0%} of {len(docs)} documents and keep some for training")
    return list(docs[: len(docs) - n_held]), list(docs[len(docs) - n_held :])


def heldout_text(
    pattern: str, fraction: float = 0.1, *, doc_separator: str = "blank_line", text_field: str = "text"
) -> str:
    """The held-out tail of a corpus (what a files source or text_tfds calls "validation"), documents joined by
    blank lines: perplexity evaluation reads this, training reads the rest."""
    docs = read_documents(pattern, doc_separator=doc_separator, text_field=text_field)
    return "\n\n".join(split_documents(docs, fraction)[1])


class _TfdsDocuments:
    """Text of one feature of a TFDS split, through tfds.data_source (array_record; no TensorFlow)."""

    def __init__(self, src: SourceConfig):
        import tensorflow_datasets as tfds  # imported here: ~0.5 s, and only TFDS sources need it

        self._source = tfds.data_source(src.name, split=src.split, data_dir=src.data_dir)
        features = self._source.dataset_info.features
        if src.text_field not in features:
            raise ValueError(f"TFDS dataset {src.name!r} has no feature {src.text_field!r}; it has {list(features)}")
        self._field = src.text_field
        self.fingerprint = f"tfds:{src.name}:{self._source.dataset_info.version}:{src.split}:{src.text_field}"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        text = self._source[index][self._field]
        return text.decode("utf-8") if isinstance(text, bytes) else str(text)


class _FileDocuments(list):
    """Documents of a files source (one split of it), with a fingerprint of their content."""

    def __init__(self, src: SourceConfig):
        docs = read_documents(src.glob, doc_separator=src.doc_separator, text_field=src.text_field)
        train, held = split_documents(docs, src.heldout_fraction)
        super().__init__(held if src.split == "validation" else train)
        h = hashlib.sha256(f"{src.doc_separator}:{src.text_field}:{src.heldout_fraction}:{src.split}".encode())
        for path in _paths(src.glob):
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        self.fingerprint = "files:" + h.hexdigest()


def _documents(src: SourceConfig):
    docs = _TfdsDocuments(src) if src.kind == "tfds" else _FileDocuments(src)
    if not len(docs):
        raise ValueError(f"source {src.name or src.glob!r} split {src.split!r} has no documents")
    return docs


# ---------------------------------------------------------------------------------------------------------------
# Tokens.


class _Encoder:
    """text -> int32 token ids with BOS/EOS. Picklable if the tokenizer is (grain workers need that)."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool | None, add_eos: bool | None):
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_id] if (tokenizer.add_bos if add_bos is None else add_bos) else []
        self.eos = [tokenizer.eos_id] if (tokenizer.add_eos if add_eos is None else add_eos) else []
        if None in self.bos + self.eos:
            raise ValueError("the tokenizer has no BOS/EOS id, but the data config asks to add it")

    def __call__(self, text: str) -> np.ndarray:
        return np.asarray(self.bos + self.tokenizer.encode(text) + self.eos, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if not hasattr(self.tokenizer, "encode_batch"):
            return [self(t) for t in texts]
        return [np.asarray(self.bos + ids + self.eos, np.int32) for ids in self.tokenizer.encode_batch(texts)]

    def fingerprint(self) -> str:
        tok = self.tokenizer
        probe = "Hello, world! 12345 naïve café — 東京\n\tend."
        spec = [type(tok).__name__, tok.vocab_size, self.bos, self.eos, list(tok.encode(probe))]
        own = getattr(tok, "fingerprint", None)
        own = own() if callable(own) else own
        return hashlib.sha256(json.dumps([own, spec]).encode()).hexdigest()[:16]


class _CachedTokens:
    """Random access to the documents of a token cache (memory-mapped; reopened, not copied, in workers)."""

    def __init__(self, path: str):
        self.path = path
        self._tokens = None
        self._offsets = np.load(path + ".offsets.npy")
        self._len = len(self._offsets) - 1

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def lengths(self) -> np.ndarray:
        return np.diff(self._offsets)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.load(self.path + ".tokens.npy", mmap_mode="r").view(np.ndarray)
        return np.asarray(self._tokens[self._offsets[index] : self._offsets[index + 1]], np.int32)


def _save_atomic(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def cached_tokens(docs: Sequence[str], encoder: _Encoder, cache_dir: str, key: str) -> _CachedTokens:
    """The token cache of `docs` under `cache_dir/key`, built (batched tokenization) if missing."""
    path = os.path.join(cache_dir, key)
    if not (os.path.exists(path + ".tokens.npy") and os.path.exists(path + ".offsets.npy")):
        os.makedirs(cache_dir, exist_ok=True)
        dtype = np.uint16 if encoder.tokenizer.vocab_size <= 2**16 else np.int32
        chunks = []
        for start in range(0, len(docs), 1024):
            chunks += encoder.encode_batch([docs[i] for i in range(start, min(start + 1024, len(docs)))])
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
        _save_atomic(path + ".tokens.npy", np.concatenate(chunks).astype(dtype))
        _save_atomic(path + ".offsets.npy", offsets)
    return _CachedTokens(path)


# ---------------------------------------------------------------------------------------------------------------
# Order, blocks, packing.


def _proportions(weights: Sequence[float]) -> list[int]:
    """Mixture weights as the smallest integer proportions (0.7, 0.3 -> 7, 3)."""
    fracs = [fractions.Fraction(w).limit_denominator(1000) for w in weights]
    den = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * den) for f in fracs]
    ints = [i // math.gcd(*ints) for i in ints]
    if sum(ints) > 10**6:
        raise ValueError(f"mixture weights {list(weights)} need a period of {sum(ints)} draws: use simpler ratios")
    return ints


class _Order:
    """The global document order: position g -> (source, document), a pure function of the config and g.

    Sources are drawn by a smooth weighted round robin over their integer proportions; the k-th draw from source s is
    document permutation(k mod n_s) of epoch k // n_s, seeded by (seed_s + epoch) as grain's `shuffle` + `repeat`
    reseed: every epoch of every source is a fresh permutation, and no epoch counter needs storing."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int, shuffle: bool):
        props = _proportions(weights)
        slots = sorted(((k + 0.5) / w, i, k) for i, w in enumerate(props) for k in range(w))
        self.slot_source = np.array([i for _, i, _ in slots], np.int64)
        self.slot_rank = np.array([k for _, _, k in slots], np.int64)
        self.props, self.sizes = np.array(props, np.int64), np.array(sizes, np.int64)
        self.seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(len(sizes))]
        self.shuffle = shuffle

    def __call__(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cycle, r = np.divmod(g, len(self.slot_source))
        src = self.slot_source[r]
        epoch, pos = np.divmod(cycle * self.props[src] + self.slot_rank[r], self.sizes[src])
        if self.shuffle:
            pos = pos.copy()
            for s, e in {(int(s), int(e)) for s, e in zip(src, epoch)}:
                m = (src == s) & (epoch == e)
                pos[m] = _shuffle(pos[m], int(self.sizes[s]), (self.seeds[s] + e) % 2**32)
        return src, pos


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n).astype(np.int32 if n < 2**31 else np.int64)


def _shuffle(pos: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Position -> document under the permutation of [0, n) that `seed` names: a cached numpy permutation (fast)
    for sources up to PERMUTATION_MAX_DOCS documents, grain's index_shuffle (O(1) memory) above."""
    if n == 1:
        return np.zeros_like(pos)
    if n <= PERMUTATION_MAX_DOCS:
        return _permutation(n, seed)[pos]
    return np.array([index_shuffle(int(p), max_index=n - 1, seed=seed, rounds=4) for p in pos], np.int64)


class _FetchBlock:
    """Block b of this host -> the token arrays of its BLOCK_DOCS documents, which sit at global positions
    j * process_count + process_index for j in [b * BLOCK_DOCS, (b + 1) * BLOCK_DOCS): tokenized in one batch, or
    read from the token cache."""

    def __init__(self, order: _Order, sources: list, encoder: _Encoder, process_index: int, process_count: int):
        self.order, self.sources, self.encoder = order, sources, encoder
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, b: int) -> list[np.ndarray]:
        j = np.arange(b * BLOCK_DOCS, (b + 1) * BLOCK_DOCS, dtype=np.int64)
        src, doc = self.order(j * self.process_count + self.process_index)
        out = [None] * BLOCK_DOCS
        for s in np.unique(src):
            (idx,) = np.nonzero(src == s)
            source = self.sources[s]
            if isinstance(source, _CachedTokens):
                arrays = [source[int(d)] for d in doc[idx]]
            else:
                arrays = self.encoder.encode_batch([source[int(d)] for d in doc[idx]])
            for i, a in zip(idx, arrays):
                out[i] = a
        return out


class _PackIterator(grain.DatasetIterator):
    """Blocks of documents (token arrays) -> rows of T (input, target) pairs with segment ids and positions."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._block, self._block_state, self._doc, self._offset = None, None, 0, 0
        self._arange = np.arange(seq_len, dtype=np.int32)

    def _next_block(self) -> None:
        self._block_state = self._parent.get_state()
        self._block, self._doc, self._offset = next(self._parent), 0, 0

    def __next__(self) -> dict[str, np.ndarray]:
        t = self._seq_len
        row = {k: np.zeros(t, np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
        fill = segment = 0
        while fill < t:
            if self._block is None or self._doc == len(self._block):
                try:
                    self._next_block()
                except StopIteration:
                    if fill:
                        break
                    raise
            doc, o = self._block[self._doc], self._offset
            take = min(len(doc) - 1 - o, t - fill)
            if take > 0:
                segment += 1
                row["inputs"][fill : fill + take] = doc[o : o + take]
                row["targets"][fill : fill + take] = doc[o + 1 : o + take + 1]
                row["segment_ids"][fill : fill + take] = segment
                row["positions"][fill : fill + take] = self._arange[:take]
                fill, self._offset = fill + take, o + take
            if self._offset >= len(doc) - 1:
                self._doc, self._offset = self._doc + 1, 0
        row["loss_mask"] = (row["segment_ids"] > 0).astype(np.float32)
        return row

    def get_state(self) -> dict[str, Any]:
        if self._block is None:
            return {"parent": self._parent.get_state(), "doc": 0, "offset": 0}
        return {"parent": self._block_state, "doc": self._doc, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._block = None
        if state["doc"] or state["offset"]:
            self._next_block()
            self._doc, self._offset = state["doc"], state["offset"]


class _PackDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len)


# ---------------------------------------------------------------------------------------------------------------
# The iterator.


class Iterator:
    """Host-local batches (see the module docstring), with a JSON-able state for the training checkpoint."""

    def __init__(self, dataset: grain.IterDataset, fingerprint: str):
        self._it = iter(dataset)
        self._fingerprint = fingerprint

    def __iter__(self) -> "Iterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return {"fingerprint": self._fingerprint, "grain": self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError(
                "data iterator state comes from another pipeline (config, host layout or tokenizer differ): "
                f"{state.get('fingerprint')} != {self._fingerprint}"
            )
        self._it.set_state(state["grain"])

    def close(self) -> None:
        if hasattr(self._it, "close"):
            self._it.close()


def _check_size(sources: list, encoder: _Encoder, need: int) -> None:
    """Fails if all sources together hold fewer (input, target) pairs than one global batch."""
    total = n_docs = 0
    for docs in sources:
        if isinstance(docs, _CachedTokens):
            total += int(np.maximum(docs.lengths() - 1, 0).sum())
            n_docs += len(docs)
            continue
        for i in range(len(docs)):
            if total >= need:
                return
            total, n_docs = total + max(len(encoder(docs[i])) - 1, 0), n_docs + 1
    if total < need:
        raise ValueError(
            f"the dataset is smaller than one batch: {n_docs} documents give {total} tokens, one global "
            f"batch needs {need} (global_batch_size x seq_len)"
        )


def make_iterator(
    cfg: DataConfig, tokenizer: Tokenizer, *, process_index: int | None = None, process_count: int | None = None
) -> Iterator:
    """This host's iterator. process_index/count default to JAX's (tests pass them to simulate hosts)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if cfg.global_batch_size % process_count:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by {process_count} hosts")
    encoder = _Encoder(tokenizer, cfg.add_bos, cfg.add_eos)
    tok_fp = encoder.fingerprint()
    sources = []
    for src in cfg.sources:
        docs = _documents(src)
        if cfg.cache_dir and (src.kind == "files" if src.cache is None else src.cache):
            key = hashlib.sha256(f"{docs.fingerprint}:{tok_fp}".encode()).hexdigest()[:24]
            docs = cached_tokens(docs, encoder, cfg.cache_dir, key)
        sources.append(docs)
    _check_size(sources, encoder, cfg.global_batch_size * cfg.seq_len)
    order = _Order([len(d) for d in sources], [s.weight for s in cfg.sources], cfg.seed, cfg.shuffle)
    ds = grain.MapDataset.range(sys.maxsize).map(_FetchBlock(order, sources, encoder, process_index, process_count))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch))
    ds = _PackDataset(ds, cfg.seq_len).batch(cfg.global_batch_size // process_count, drop_remainder=True)
    if cfg.num_workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; entry points without absl.app parse none
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    # What decides the order of batches (not where data or caches live, threads or prefetch depth).
    keep = ("sources", "seq_len", "global_batch_size", "seed", "shuffle", "add_bos", "add_eos", "num_workers")
    what = {k: v for k, v in cfg.to_dict().items() if k in keep}
    what["sources"] = [{k: v for k, v in s.items() if k not in ("data_dir", "cache")} for s in what["sources"]]
    layout = [what, process_index, process_count, tok_fp, BLOCK_DOCS]
    layout = json.dumps(layout, sort_keys=True)
    return Iterator(ds, hashlib.sha256(layout.encode()).hexdigest()[:16])


def to_global(
    batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, batch_spec: jax.sharding.PartitionSpec
) -> dict[str, jax.Array]:
    """Host-local batches -> global jax.Arrays sharded over the batch axis (`batch_spec`, e.g. P("data"))."""
    sharding = jax.sharding.NamedSharding(mesh, batch_spec)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
