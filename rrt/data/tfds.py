"""Prepare local text files as a TFDS dataset in array_record format, readable without TensorFlow.

    python -m rrt.data.tfds --input 'corpus/*.txt' --name my_corpus --data_dir ~/tfds [--heldout_fraction 0.1]

A pod job then reads it like any TFDS dataset: `SourceConfig(kind="tfds", name="my_corpus", data_dir=...)`, through
`tfds.data_source` (rrt.data). Seconds for the shared corpora (about 1 MB each).

Design notes.
* Documents come from `rrt.data.documents.read_documents` (the same reader as a "files" source: blank-line, line or
  one-per-file text, or a jsonl field), so a corpus gives the same documents either way.
* Splits: "train", plus "validation" (the last `heldout_fraction` of documents, as `rrt.data.documents.split_documents`
  and `heldout_text` cut them) when the fraction is positive; tinyshakespeare has no split of its own.
* The builder class is made per dataset name and not registered (the name is the user's); a reader needs no class:
  `tfds.data_source` rebuilds the dataset from the files in `data_dir`. Shuffling at write time is off, so record i
  is document i; the pipeline shuffles globally anyway.
"""

import argparse
import re
import types

import tensorflow_datasets as tfds
from tensorflow_datasets.core import download

from rrt.data import documents

VERSION = "1.0.0"


class _TextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Documents of local text files, one feature `text`. Subclassed per corpus by `builder`."""

    VERSION = tfds.core.Version(VERSION)
    input_glob: str
    doc_separator: str
    text_field: str
    heldout_fraction: float

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Documents of {self.input_glob} (doc_separator={self.doc_separator}, "
            f"text_field={self.text_field}); validation: the last {self.heldout_fraction:.1%} of documents.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        docs = documents.read_documents(self.input_glob, doc_separator=self.doc_separator, text_field=self.text_field)
        train, heldout = documents.split_documents(docs, self.heldout_fraction)
        splits = {"train": self._generate_examples(train)}
        if heldout:
            splits["validation"] = self._generate_examples(heldout)
        return splits

    def _generate_examples(self, docs):
        for i, doc in enumerate(docs):
            yield i, {"text": doc}


def builder(
    name: str,
    input_glob: str,
    data_dir: str,
    *,
    doc_separator: str = "blank_line",
    text_field: str = "text",
    heldout_fraction: float = 0.0,
) -> tfds.core.GeneratorBasedBuilder:
    """A builder (array_record) for the documents of `input_glob`, named `name`, under `data_dir`."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"TFDS dataset name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")
    documents.SourceConfig("files", glob=input_glob, doc_separator=doc_separator, heldout_fraction=heldout_fraction)
    attrs = dict(
        name=name,
        input_glob=input_glob,
        doc_separator=doc_separator,
        text_field=text_field,
        heldout_fraction=heldout_fraction,
    )
    cls = types.new_class(
        "".join(p.title() for p in name.split("_")),
        (_TextCorpus,),
        {"skip_registration": True},
        lambda ns: ns.update(attrs),
    )
    return cls(data_dir=data_dir, file_format="array_record")


def prepare(
    name: str,
    input_glob: str,
    data_dir: str,
    *,
    doc_separator: str = "blank_line",
    text_field: str = "text",
    heldout_fraction: float = 0.0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Writes the dataset (kept if already there, unless `overwrite`); returns {split: documents}."""
    b = builder(
        name,
        input_glob,
        data_dir,
        doc_separator=doc_separator,
        text_field=text_field,
        heldout_fraction=heldout_fraction,
    )
    mode = download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if overwrite:
        mode = download.GenerateMode.FORCE_REDOWNLOAD
    b.download_and_prepare(download_config=download.DownloadConfig(download_mode=mode))
    return {split: info.num_examples for split, info in b.info.splits.items()}


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="glob(s) of .txt / .jsonl files, comma-separated")
    p.add_argument("--name", required=True, help="dataset name (snake_case)")
    p.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
    p.add_argument("--doc_separator", default="blank_line", choices=documents.DOC_SEPARATORS)
    p.add_argument("--text_field", default="text", help="jsonl field holding the text")
    p.add_argument("--heldout_fraction", type=float, default=0.0, help="last fraction of documents -> 'validation'")
    p.add_argument("--overwrite", action="store_true", help="rewrite an existing dataset of this name and version")
    a = p.parse_args(argv)
    splits = prepare(
        a.name,
        a.input,
        a.data_dir,
        doc_separator=a.doc_separator,
        text_field=a.text_field,
        heldout_fraction=a.heldout_fraction,
        overwrite=a.overwrite,
    )
    print(f"{a.name} {VERSION} in {a.data_dir}: " + ", ".join(f"{k}: {v} documents" for k, v in splits.items()))


if __name__ == "__main__":
    run()
