"""Evaluating a model in process: held-out perplexity (after each loop) and few-shot tasks, one code path.

Training's periodic and final evaluation, the demo and the paper-reproduction driver all call `evaluate`; the CLI
`rrt.evaluate` scores one task at a time with the same functions underneath (rrt.eval.perplexity, rrt.eval.fewshot).

    texts   = heldout_texts(sources, names)        # {corpus: held-out tail} of the config's files sources
    results = evaluate(model, tokenizer, Spec(...), texts)
    flat    = flat_metrics(results, n_loops)       # eval/<corpus>/ppl[_loop<r>], eval/<task>/<metric>[_loop<r>]

`evaluate` skips what `done` already holds and calls `on_result(kind, name, result, seconds)` after each corpus
and task, so a long evaluation (the reproduction's) can be stored piece by piece and resumed.
"""

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

from rrt import model as model_lib
from rrt.data import documents
from rrt.eval import fewshot, perplexity, scoring, tasks


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to evaluate. Library code takes this; entry points build it from their config or flags."""

    seq_len: int = 256  # perplexity window, tokens (with the BOS, where the tokenizer adds one: rrt.eval.perplexity)
    windows: int = 16  # perplexity windows per corpus (0: all)
    tasks: tuple[str, ...] = ()  # few-shot task names or specs (rrt.eval.tasks)
    data_dir: str | None = None  # the directory holding eval/ (the shared data)
    shots: int = 0
    limit: int | None = 100  # items per task (None: all)
    batch_size: int = 8

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.seq_len < 2:
            raise ValueError(
                f"eval seq_len must be at least 2 (a window scores seq_len - 1 tokens), got {self.seq_len}"
            )
        if self.windows < 0:
            raise ValueError(f"eval windows must be >= 0 (0: all), got {self.windows}")
        if self.batch_size < 1:
            raise ValueError(f"eval batch_size must be positive, got {self.batch_size}")
        if self.shots < 0:
            raise ValueError(f"eval shots must be >= 0, got {self.shots}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"eval limit must be positive (or None: all items), got {self.limit}")


def corpus_name(source: dict) -> str:
    """A files source's name: its `name` if it has one, else the stem of its glob ("../corpora/tinystories_val.txt"
    -> "tinystories_val")."""
    if source.get("name"):
        return source["name"]
    return os.path.splitext(os.path.basename(source.get("glob", "")))[0]


def heldout_texts(sources: Sequence[dict], names: Sequence[str] | None = None) -> dict[str, str]:
    """{corpus: held-out tail} of the files sources with a heldout_fraction (only those in `names`, if given)."""
    out = {}
    for src in sources:
        src = dict(src)
        name = corpus_name(src)
        if src.get("kind") != "files" or not src.get("heldout_fraction") or (names is not None and name not in names):
            continue
        out[name] = documents.heldout_text(
            src["glob"],
            src["heldout_fraction"],
            doc_separator=src.get("doc_separator", "blank_line"),
            text_field=src.get("text_field", "text"),
        )
    return out


def evaluate(
    model: model_lib.Decoder,
    tokenizer,
    spec: Spec,
    texts: dict[str, str],
    *,
    done: dict | None = None,
    on_result: Callable[[str, str, dict, float], None] | None = None,
    progress: bool = False,
) -> dict:
    """{"perplexity": {corpus: perplexity result}, "tasks": {task: task result}} (see rrt.eval.perplexity and
    rrt.eval.fewshot for the result dicts). Entries of `done` (same shape) are kept and not scored again."""
    done = done or {}
    results = {"perplexity": dict(done.get("perplexity", {})), "tasks": dict(done.get("tasks", {}))}
    scorer = scoring.make_scorer(model)
    for corpus, text in texts.items():
        if corpus in results["perplexity"]:
            continue
        t0 = time.time()
        res = perplexity.text_perplexity(
            model,
            tokenizer,
            text,
            spec.seq_len,
            batch_size=spec.batch_size,
            progress=progress,
            scorer=scorer,
            max_windows=spec.windows,
        )
        results["perplexity"][corpus] = res
        if on_result:
            on_result("perplexity", corpus, res, time.time() - t0)
    for task in spec.tasks:
        if tasks.task_name(task) in results["tasks"]:
            continue
        t0 = time.time()
        res = fewshot.evaluate_tasks(
            model,
            tokenizer,
            [task],
            data_dir=spec.data_dir,
            shots=spec.shots,
            limit=spec.limit,
            batch_size=spec.batch_size,
            progress=progress,
            scorer=scorer,
        )
        (name,) = res
        results["tasks"][name] = res[name]
        if on_result:
            on_result("tasks", name, res[name], time.time() - t0)
    return results


def flat_metrics(results: dict, n_loops: int) -> dict[str, float]:
    """Flat scalars for a training log: eval/<corpus>/ppl and ppl_loop<r>; eval/<task>/<metric> (last loop) and
    <metric>_loop<r> when the model loops more than once."""
    flat: dict[str, float] = {}
    for corpus, res in results["perplexity"].items():
        for pl in res["per_loop"]:
            flat[f"eval/{corpus}/ppl_loop{pl['loop']}"] = pl["ppl"]
        flat[f"eval/{corpus}/ppl"] = res["ppl"]
    for name, res in results["tasks"].items():
        metrics = ("acc", "acc_norm", "ppl")
        for m in metrics:
            if res.get(m) is not None:
                flat[f"eval/{name}/{m}"] = float(res[m])
        if n_loops > 1:
            for row in res["per_loop"]:
                for m in metrics:
                    if row.get(m) is not None:
                        flat[f"eval/{name}/{m}_loop{row['loop']}"] = float(row[m])
    return flat
