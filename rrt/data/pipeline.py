"""The per-host iterator: sources -> blocks (read or cached, tokenized) -> packed rows -> batches, resumable.

See the package docstring (rrt/data/__init__.py) for the design.
"""

import dataclasses
import hashlib
import json
import sys
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from rrt.data import documents, ordering, packing, tokens

BLOCK_DOCS = 64  # documents per grain element: grain's per-element cost is paid once per block


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The whole pipeline. Library code takes this; entry points build it from their ConfigDict."""

    sources: tuple[documents.SourceConfig, ...]
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


class FetchBlock:
    """Block b of this host -> the token arrays of its BLOCK_DOCS documents, which sit at global positions
    j * process_count + process_index for j in [b * BLOCK_DOCS, (b + 1) * BLOCK_DOCS): tokenized in one batch, or
    read from the token cache."""

    def __init__(
        self, order: ordering.Order, sources: list, encoder: tokens.Encoder, process_index: int, process_count: int
    ):
        self.order, self.sources, self.encoder = order, sources, encoder
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, b: int) -> list[np.ndarray]:
        j = np.arange(b * BLOCK_DOCS, (b + 1) * BLOCK_DOCS, dtype=np.int64)
        src, doc = self.order(j * self.process_count + self.process_index)
        out = [None] * BLOCK_DOCS
        for s in np.unique(src):
            (idx,) = np.nonzero(src == s)
            source = self.sources[s]
            if isinstance(source, tokens.CachedTokens):
                arrays = [source[int(d)] for d in doc[idx]]
            else:
                arrays = self.encoder.encode_batch([source[int(d)] for d in doc[idx]])
            for i, a in zip(idx, arrays):
                out[i] = a
        return out


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


def _check_size(sources: list, encoder: tokens.Encoder, need: int) -> None:
    """Fails if all sources together hold fewer (input, target) pairs than one global batch."""
    total = n_docs = 0
    for docs in sources:
        if isinstance(docs, tokens.CachedTokens):
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
    cfg: DataConfig, tokenizer: tokens.Tokenizer, *, process_index: int | None = None, process_count: int | None = None
) -> Iterator:
    """This host's iterator. process_index/count default to JAX's (tests pass them to simulate hosts)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if cfg.global_batch_size % process_count:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by {process_count} hosts")
    encoder = tokens.Encoder(tokenizer, cfg.add_bos, cfg.add_eos)
    tok_fp = encoder.fingerprint()
    sources = []
    for src in cfg.sources:
        docs = documents.documents(src)
        if cfg.cache_dir and (src.kind == "files" if src.cache is None else src.cache):
            key = hashlib.sha256(f"{docs.fingerprint}:{tok_fp}".encode()).hexdigest()[:24]
            docs = tokens.cached_tokens(docs, encoder, cfg.cache_dir, key)
        sources.append(docs)
    _check_size(sources, encoder, cfg.global_batch_size * cfg.seq_len)
    order = ordering.Order([len(d) for d in sources], [s.weight for s in cfg.sources], cfg.seed, cfg.shuffle)
    ds = grain.MapDataset.range(sys.maxsize).map(FetchBlock(order, sources, encoder, process_index, process_count))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch))
    ds = packing.PackDataset(ds, cfg.seq_len).batch(cfg.global_batch_size // process_count, drop_remainder=True)
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
