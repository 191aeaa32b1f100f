"""The few-shot evaluation sets: files -> normalized documents -> (context, continuation) requests, as lm-eval does.

Every task is one of three kinds, and a document of each kind has one normalized form:

    mc       {"query", "choices", "gold"}              requests (fewshot + query, " " + choice) per choice
    partial  {"context_options", "continuation", "gold"}  requests (fewshot + option, " " + continuation) per option
    cloze    {"context", "target"}                     one request (fewshot + context, target); LAMBADA

Prompts follow lm-eval-harness 0.4.13's task YAMLs (read from the installed package, see docs/FEWSHOT.md):
* hellaswag: query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
  choices = preprocess(endings). The shared file holds the joined context with ctx_b uncapitalized (llama.cpp's
  export), so ctx_b is recovered: for ActivityNet items (ctx_b is the incomplete noun phrase that ends the context,
  after the last ". ") the lower-case tail is `str.capitalize`d, as lm-eval does to ctx_b; WikiHow items (": How to"
  follows the label) have an empty ctx_b and are left as they are.
* piqa: "Question: {goal}\\nAnswer:" with choices [sol1, sol2]; arc_easy / arc_challenge: the file's query
  ("Question: ...", llm-foundry form) + "\\nAnswer:", which is lm-eval's "Question: {question}\\nAnswer:";
  openbookqa: the question stem as is; winogrande: partial scoring, contexts = the sentence up to the blank with
  each option.
* lambada (lambada_openai): context = text.split(" ")[:-1] joined by " ", target = " " + the last " "-separated word.
* k-shot: k examples drawn from the same file (the only split we have) with a per-item seeded RNG, never the item
  itself (nor a document equal to it, as lm-eval's sampler removes by equality); each is rendered as
  `question + " " + answer` and followed by "\\n\\n", then the item's own question. For cloze tasks the answer is the
  target, which already starts with a space, so an example reads "context  word" (two spaces): lm-eval does the same.
* Generic tasks: `mc:<path.jsonl>` and `partial:<path.jsonl>` read the normalized forms directly; the task is named
  after the file's stem.
"""

import dataclasses
import json
import os
import random
import re

KINDS = ("mc", "partial", "cloze")
# name -> (kind, file(s) under <data_dir>/eval)
PAPER_TASKS = {
    "lambada": ("cloze", "lambada_test.jsonl"),
    "hellaswag": ("mc", "hellaswag_val.txt"),
    "piqa": ("mc", "piqa_valid.jsonl"),
    "winogrande": ("partial", "winogrande.jsonl"),
    "arc_easy": ("mc", "arc_easy.jsonl"),
    "arc_challenge": ("mc", "arc_challenge.jsonl"),
    "openbookqa": ("mc", "openbook_qa.jsonl"),
}
FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # mc | partial | cloze
    docs: list[dict]
    source: str  # the file it was read from


@dataclasses.dataclass(frozen=True)
class Request:
    """One loglikelihood request: score `continuation` given `context`."""

    doc: int  # index of the document in the task
    option: int  # which choice / context option (0 for cloze)
    context: str
    continuation: str


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such evaluation file")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON: {e}") from e
    return out


def _check(path: str, i: int, doc: dict, kind: str) -> dict:
    """Validates a normalized document; the error names the file and the record."""

    def bad(msg):
        raise ValueError(f"{path}: record {i}: {msg} (kind {kind!r}): {str(doc)[:200]}")

    keys = {"mc": ("query", "choices", "gold"), "partial": ("context_options", "continuation", "gold")}.get(
        kind, ("context", "target")
    )
    missing = [k for k in keys if k not in doc]
    if missing:
        bad(f"missing keys {missing}")
    if kind == "cloze":
        return {"context": str(doc["context"]), "target": str(doc["target"])}
    options = doc["choices"] if kind == "mc" else doc["context_options"]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        bad("needs a list of at least two strings")
    gold = doc["gold"]
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        bad(f"gold {gold!r} is not an index into the {len(options)} options")
    if kind == "mc":
        return {"query": str(doc["query"]), "choices": list(options), "gold": gold}
    return {"context_options": list(options), "continuation": str(doc["continuation"]), "gold": gold}


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess` (tasks/hellaswag/utils.py)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_query(line: str) -> str:
    """lm-eval's query from the file's "label: ctx_a ctx_b" line (see the module docstring for ctx_b)."""
    if ": How to " not in line:  # ActivityNet: ctx_b is the lower-case fragment after the last sentence end
        head, sep, tail = line.rpartition(". ")
        if not sep:
            head, sep, tail = line.partition(": ")
        if sep and tail[:1].islower():
            line = head + sep + tail.capitalize()
    return hellaswag_preprocess(line)


def _hellaswag(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, gold, 4 endings)")
    docs = []
    for i in range(0, len(lines), 6):
        gold = lines[i + 1].strip()
        if gold not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}:{i + 2}: gold index {gold!r} is not 0-3")
        docs.append(
            {
                "query": hellaswag_query(lines[i]),
                "choices": [hellaswag_preprocess(e) for e in lines[i + 2 : i + 6]],
                "gold": int(gold),
            }
        )
    return docs


def _piqa(path: str) -> list[dict]:
    labels_path = path.replace("_valid.jsonl", "_valid_labels.lst")
    with open(labels_path, encoding="utf-8") as f:
        labels = [line.strip() for line in f if line.strip()]
    records = _read_jsonl(path)
    if len(labels) != len(records):
        raise ValueError(f"{path}: {len(records)} records but {labels_path} has {len(labels)} labels")
    return [
        {"query": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "gold": int(lab)}
        for r, lab in zip(records, labels)
    ]


def _lambada(path: str) -> list[dict]:
    docs = []
    for r in _read_jsonl(path):
        words = r["text"].split(" ")
        docs.append({"context": " ".join(words[:-1]), "target": " " + words[-1]})
    return docs


def _arc(path: str) -> list[dict]:
    return [{**d, "query": d["query"] + "\nAnswer:"} for d in _read_jsonl(path)]


READERS = {
    "lambada": _lambada,
    "hellaswag": _hellaswag,
    "piqa": _piqa,
    "winogrande": _read_jsonl,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "openbookqa": _read_jsonl,
}


def task_name(spec: str) -> str:
    """The name a task spec's results go under: the paper task's name, or a generic task file's stem."""
    kind, sep, path = spec.partition(":")
    return os.path.splitext(os.path.basename(path))[0] if sep else spec


def load(spec: str, data_dir: str | None = None) -> Task:
    """A task by name (one of PAPER_TASKS, read from <data_dir>/eval) or `mc:<path>` / `partial:<path>`."""
    kind, sep, path = spec.partition(":")
    if sep:
        if kind not in ("mc", "partial"):
            raise ValueError(f"task {spec!r}: a generic task is mc:<path.jsonl> or partial:<path.jsonl>")
        name = task_name(spec)
        records = _read_jsonl(path)
    else:
        if spec not in PAPER_TASKS:
            raise ValueError(f"unknown task {spec!r}; expected one of {list(PAPER_TASKS)}, mc:<path> or partial:<path>")
        if not data_dir:
            raise ValueError(f"task {spec!r} needs data_dir (the directory holding eval/)")
        kind, fname = PAPER_TASKS[spec]
        name, path = spec, os.path.join(data_dir, "eval", fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"task {spec!r}: {path} does not exist (is --data_dir the directory holding eval/?)"
            )
        records = READERS[spec](path)
    docs = [_check(path, i, d, kind) for i, d in enumerate(records)]
    if not docs:
        raise ValueError(f"{path}: no records")
    return Task(name=name, kind=kind, docs=docs, source=os.path.abspath(path))


def fewshot_indices(n_docs: int, item: int, shots: int, seed: int, docs: list[dict] | None = None) -> list[int]:
    """`shots` distinct document indices, never `item` (nor a document equal to it), fixed by (seed, item)."""
    if shots <= 0:
        return []
    rng = random.Random(f"{seed}:{item}")  # per item: independent of --limit, order and batching
    same = lambda j: j == item or (docs is not None and docs[j] == docs[item])  # noqa: E731
    if n_docs - 1 >= shots:
        picked = [j + (j >= item) for j in rng.sample(range(n_docs - 1), shots)]
        if not any(same(j) for j in picked):
            return picked
    pool = [j for j in range(n_docs) if not same(j)]  # rare: a duplicate of the item was drawn
    if len(pool) < shots:
        raise ValueError(f"{shots}-shot needs {shots} other documents; only {len(pool)} available")
    return rng.sample(pool, shots)


def question(kind: str, doc: dict) -> str | list[str]:
    """The text the answer follows: one string, or one per option for partial scoring."""
    return {"mc": lambda: doc["query"], "partial": lambda: doc["context_options"], "cloze": lambda: doc["context"]}[
        kind
    ]()


def example(kind: str, doc: dict) -> str:
    """A solved document as a few-shot example (without the trailing delimiter)."""
    if kind == "mc":
        return doc["query"] + TARGET_DELIMITER + doc["choices"][doc["gold"]]
    if kind == "partial":
        return doc["context_options"][doc["gold"]] + TARGET_DELIMITER + doc["continuation"]
    return doc["context"] + TARGET_DELIMITER + doc["target"]


def requests(task: Task, shots: int = 0, limit: int | None = None, seed: int = 1234) -> list[Request]:
    """All loglikelihood requests of the first `limit` documents, in document then option order."""
    out = []
    n = len(task.docs) if limit is None else min(limit, len(task.docs))
    for i in range(n):
        doc = task.docs[i]
        prefix = "".join(
            example(task.kind, task.docs[j]) + FEWSHOT_DELIMITER
            for j in fewshot_indices(len(task.docs), i, shots, seed, task.docs)
        )
        if task.kind == "mc":
            out += [Request(i, o, prefix + doc["query"], TARGET_DELIMITER + c) for o, c in enumerate(doc["choices"])]
        elif task.kind == "partial":
            cont = TARGET_DELIMITER + doc["continuation"]
            out += [Request(i, o, prefix + c, cont) for o, c in enumerate(doc["context_options"])]
        else:
            out.append(Request(i, 0, prefix + doc["context"], doc["target"]))
    return out


def choice_lengths(task: Task, doc: dict) -> list[int]:
    """lm-eval's acc_norm denominators: len() in characters of each choice as doc_to_choice returns it (without the
    target delimiter). Partial scoring shares one continuation, so its acc_norm equals acc."""
    if task.kind == "mc":
        return [len(c) for c in doc["choices"]]
    if task.kind == "partial":
        return [len(doc["continuation"])] * len(doc["context_options"])
    return [len(doc["target"])]
