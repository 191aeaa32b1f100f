"""`python tests/simulate_hosts.py N <rrt.train flags>`: rrt.train in ONE process, fed the batches N hosts would get.

The input pipeline gives each host its own slice of the document stream (`rrt.data.make_iterator`), so a run on N
processes sees different global batches than a run on one. This wrapper builds the N host iterators in one process
and concatenates their batches in process order, which is where `make_array_from_process_local_data` puts each
host's rows on a (data, fsdp) mesh: the single-process reference a multi-process run must match.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rrt import train  # noqa: E402
from rrt.data import pipeline

HOSTS = int(sys.argv.pop(1))
_make_iterator = pipeline.make_iterator


class Hosts:
    def __init__(self, iterators):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(it) for it in self.iterators]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> dict:
        return {"hosts": [it.get_state() for it in self.iterators]}

    def set_state(self, state: dict) -> None:
        for it, s in zip(self.iterators, state["hosts"], strict=True):
            it.set_state(s)

    def close(self) -> None:
        for it in self.iterators:
            it.close()


def make_iterator(cfg, tokenizer, **_):
    return Hosts([_make_iterator(cfg, tokenizer, process_index=i, process_count=HOSTS) for i in range(HOSTS)])


pipeline.make_iterator = make_iterator

if __name__ == "__main__":
    train.run()
