"""Documents: a source's config and its readers (text and JSONL files, TFDS splits), the held-out split."""

import dataclasses
import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence

DOC_SEPARATORS = ("blank_line", "line", "file")


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


def paths(pattern: str) -> list[str]:
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
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e}): {line.strip()[:120]!r}") from e
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
    for path in paths(pattern):
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


class TfdsDocuments:
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


class FileDocuments(list):
    """Documents of a files source (one split of it), with a fingerprint of their content."""

    def __init__(self, src: SourceConfig):
        docs = read_documents(src.glob, doc_separator=src.doc_separator, text_field=src.text_field)
        train, held = split_documents(docs, src.heldout_fraction)
        super().__init__(held if src.split == "validation" else train)
        h = hashlib.sha256(f"{src.doc_separator}:{src.text_field}:{src.heldout_fraction}:{src.split}".encode())
        for path in paths(src.glob):
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        self.fingerprint = "files:" + h.hexdigest()


def documents(src: SourceConfig):
    docs = TfdsDocuments(src) if src.kind == "tfds" else FileDocuments(src)
    if not len(docs):
        raise ValueError(f"source {src.name or src.glob!r} split {src.split!r} has no documents")
    return docs
