"""`--config.data.glob=<glob>[,<glob>...]`: the user's own files replace the preset's data sources, for training and
for the held-out evaluation. The expected documents are read here with json / str.split, not with rrt's readers."""

import json
import os

import pytest
import trainrun

from rrt import config, train
from rrt.data import documents, pipeline
from rrt.eval import heldout

N_FILES, DOCS_PER_FILE = 3, 12


def _doc(f: int, i: int) -> str:
    return " ".join([f"quokka {f} zebra {i} walrus"] * 3)


@pytest.fixture
def corpus(tmp_path):
    """Two JSONL files (text in field "body") in one directory and one in a subdirectory; a stray .txt beside."""
    (tmp_path / "sub").mkdir()
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "sub" / "c.jsonl"]
    for f, path in enumerate(files):
        path.write_text("".join(json.dumps({"body": _doc(f, i), "id": i}) + "\n" for i in range(DOCS_PER_FILE)))
    (tmp_path / "ignored.txt").write_text("not part of the corpus\n")
    return f"{tmp_path}/*.jsonl,{tmp_path}/sub/*.jsonl", files


def _expected_docs(files) -> list[str]:
    docs = []
    for path in sorted(str(p) for p in files):
        with open(path) as f:
            docs += [json.loads(line)["body"] for line in f]
    return docs


def _glob_config(glob: str):
    c = config.preset("tiny")
    c.data.glob = glob
    c.data.text_field = "body"
    c.data.heldout_fraction = 0.25
    return c


def test_glob_replaces_sources(corpus, tmp_path):
    glob, files = corpus
    c = _glob_config(glob)
    dcfg = train.data_config(c, str(tmp_path / "wd"))
    (src,) = dcfg.sources
    assert (src.kind, src.glob, src.text_field, src.heldout_fraction) == ("files", glob, "body", 0.25)
    docs = _expected_docs(files)
    n_held = len(docs) // 4  # 36 documents, a quarter held out
    assert list(documents.documents(src)) == docs[:-n_held]
    # the held-out evaluation scores the glob's tail (named "data"); the preset's corpora are gone
    assert config.heldout_names(c) == ["data"]
    texts = heldout.heldout_texts(config.data_sources(c), config.heldout_names(c))
    assert texts == {"data": "\n\n".join(docs[-n_held:])}
    # unset, the preset's sources stand
    tiny = config.preset("tiny")
    assert config.data_sources(tiny) == [dict(s) for s in tiny.data.sources]
    assert config.heldout_names(tiny) == ["tinystories_val"]
    tiny.data.text_field = "body"  # without data.glob it would be ignored: refused, named
    with pytest.raises(ValueError, match="data.text_field='body' only apply with data.glob"):
        config.data_sources(tiny)


def test_glob_batches_hold_only_those_files(corpus, tmp_path):
    from rrt.formats import gguf
    from rrt.formats import tokenizer as tokenizer_lib

    try:
        tok = tokenizer_lib.load_tokenizer(gguf.smollm2_gguf_path())
    except FileNotFoundError as e:
        import needs

        needs.missing(str(e))
    glob, files = corpus
    c = _glob_config(glob)
    c.data.seq_len = 32
    it = pipeline.make_iterator(train.data_config(c, str(tmp_path / "wd")), tok, process_index=0, process_count=1)
    docs = _expected_docs(files)
    batch = next(it)
    pieces = 0
    for row, seg in zip(batch["inputs"], batch["segment_ids"]):
        for s in set(seg[seg > 0].tolist()):  # each packed segment: a piece of one document of the glob's files
            text = tok.decode([int(t) for t in row[seg == s] if t not in (tok.bos_id, tok.eos_id)]).strip()
            assert text and any(text in d for d in docs), text
            pieces += 1
    assert pieces >= len(batch["inputs"])


# default run under 20 min on CI; the glob's batches are checked by test_glob_batches_hold_only_those_files
@pytest.mark.slow
def test_glob_from_the_command_line(corpus, tmp_path):
    """rrt.train with the override flags: the run trains on the files and evaluates their held-out tail."""
    if not os.path.isdir(config.shared_data()):
        import needs

        needs.missing(f"the shared data {config.shared_data()} is missing")
    glob, _ = corpus
    wd = tmp_path / "run"
    trainrun.run(
        wd,
        f"--config.data.glob={glob}",
        "--config.data.text_field=body",
        "--config.data.heldout_fraction=0.25",
        "--config.optim.warmup_steps=0",
        steps=1,
    )
    with open(wd / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    final = records[-1]
    assert "eval/data/ppl" in final and not any(k.startswith("eval/tinystories") for k in final), final
    with open(wd / train.TRAIN_CONFIG) as f:
        recorded = json.load(f)["data"]
    assert (recorded["glob"], recorded["text_field"]) == (glob, "body")
