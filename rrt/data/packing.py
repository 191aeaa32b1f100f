"""Packing: blocks of documents (token arrays) -> rows of T (input, target) pairs with segment ids, positions."""

from typing import Any

import grain
import numpy as np

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class PackIterator(grain.DatasetIterator):
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


class PackDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self._seq_len)
