"""Tokens: text -> token ids with BOS/EOS (`Encoder`), and the on-disk token cache of a source.

The cache is memory-mapped, so it must be local. A cache directory on Cloud Storage (the default under a gs://
workdir) is mirrored: its files are downloaded to a local copy (rrt.paths.local_copy_dir) and mapped there; a cache
that is missing is built locally and then uploaded (by every host that built it: the same bytes, each upload a whole
object), so that a rerun or another host downloads it instead of tokenizing again.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from etils import epath

from rrt import paths


class Tokenizer(Protocol):
    """What the pipeline uses of a tokenizer (rrt.formats.tokenizer.load_tokenizer returns one)."""

    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


class Encoder:
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


class CachedTokens:
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


def save_atomic(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


SUFFIXES = (".tokens.npy", ".offsets.npy")


def cached_tokens(docs: Sequence[str], encoder: Encoder, cache_dir: str, key: str) -> CachedTokens:
    """The token cache of `docs` under `cache_dir/key`, built (batched tokenization) if missing. A gs:// cache_dir
    is mirrored in a local directory (see the module docstring)."""
    if not paths.is_url(cache_dir):
        return CachedTokens(_build(docs, encoder, cache_dir, key))
    remote = epath.Path(cache_dir)
    local_dir = paths.local_copy_dir(cache_dir)
    path = os.path.join(local_dir, key)
    if not _complete(path):
        os.makedirs(local_dir, exist_ok=True)
        if all((remote / (key + s)).exists() for s in SUFFIXES):
            for s in SUFFIXES:  # streamed: a cache can be larger than memory
                tmp = f"{path}{s}.tmp{os.getpid()}"
                with (remote / (key + s)).open("rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
                os.replace(tmp, path + s)
        else:
            _build(docs, encoder, local_dir, key)
            for s in SUFFIXES:  # offsets last: as locally, both present marks a complete cache
                with open(path + s, "rb") as src, (remote / (key + s)).open("wb") as dst:  # one object upload
                    shutil.copyfileobj(src, dst, 1 << 24)
    return CachedTokens(path)


def _complete(path: str) -> bool:
    return all(os.path.exists(path + s) for s in SUFFIXES)


def _build(docs: Sequence[str], encoder: Encoder, cache_dir: str, key: str) -> str:
    """`cache_dir/key`, its two files written if missing (a local directory)."""
    path = os.path.join(cache_dir, key)
    if not _complete(path):
        os.makedirs(cache_dir, exist_ok=True)
        dtype = np.uint16 if encoder.tokenizer.vocab_size <= 2**16 else np.int32
        chunks = []
        for start in range(0, len(docs), 1024):
            chunks += encoder.encode_batch([docs[i] for i in range(start, min(start + 1024, len(docs)))])
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
        save_atomic(path + ".tokens.npy", np.concatenate(chunks).astype(dtype))
        save_atomic(path + ".offsets.npy", offsets)
    return path
