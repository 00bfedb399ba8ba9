"""The train-step part of a run summary, folded a batch of records at a time.

Train steps are nearly every record of a long log, and folding them one by one in Python
was most of `gradience monitor`'s time on a million-line log (about 2.5 µs of 4.6 µs a
record). A batch folds with C-level operations instead (dict.update, map, min, deque
extend) and takes the record-at-a-time rule whenever the batch holds anything unusual: a
loss that is not a finite float, a key not seen before. Both paths give the same summary,
which `tests/test_monitor.py` checks on randomised logs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from operator import itemgetter, methodcaller
from typing import Any

from gradience.telemetry.chunks import own_key_getter

_LOSS = methodcaller("get", "loss")


def finite_number(x: Any) -> float | None:
    """A finite float, or None for anything else (null, strings, bools, inf)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        try:
            x = float(x)
        except OverflowError:  # an integer literal beyond float range
            return None
        return x if math.isfinite(x) else None
    return None


def one_layout(records: list[dict[str, Any]]) -> bool:
    """Whether every record has the last one's keys, in the same order.

    Keys as tuples, not dict views: parsers hand out the same key objects line after line,
    and tuple equality tries identity first (fewer instructions than view equality).
    """
    layout = tuple(records[-1])
    return all(map(layout.__eq__, map(tuple, records)))


class TrainFold:
    """Running summary of train_step records: count, first and last step, the latest finite
    value of every number (a NaN step does not blank one), the last `window` losses and the
    minimum loss with its step (the first step where it was reached).

    Args:
        envelope: record keys that are not metrics.
        max_keys: distinct metric keys kept (a log could invent millions).
        window: losses kept for the trend.
    """

    def __init__(self, envelope: frozenset[str], max_keys: int, window: int) -> None:
        self.envelope, self.max_keys = envelope, max_keys
        self.n = 0
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.latest: dict[str, float] = {}
        self.losses: deque[tuple[int | None, float]] = deque(maxlen=window)
        self.min_loss: tuple[float | None, int | None] = (None, None)
        self._loss_getter: itemgetter[Any] | None = None

    def add(self, step: int | None, data: dict[str, Any]) -> None:
        """Fold one record: the rule every batch must agree with."""
        self.n += 1
        if self.first_step is None:
            self.first_step = step
        self.last_step = step
        latest, loss = self.latest, None
        for key, value in data.items():
            if value is None or key in self.envelope or (key not in latest and len(latest) >= self.max_keys):
                continue
            # `finite_number` inlined for floats, the common case.
            if type(value) is not float or value - value != 0:  # `x - x != 0`: inf or NaN
                value = finite_number(value)
                if value is None:
                    continue
            latest[key] = value
            if key == "loss":
                loss = value
        if loss is not None:
            self._loss(step, loss)

    def _loss(self, step: int | None, loss: float) -> None:
        self.losses.append((step, loss))
        if self.min_loss[0] is None or loss < self.min_loss[0]:
            self.min_loss = (loss, step)

    def add_batch(self, batch: list[dict[str, Any]], steps: Sequence[int | None], uniform: bool) -> None:
        """Fold consecutive records as `add` would, one by one.

        Args:
            steps: the records' `step` fields.
            uniform: `one_layout(batch)`, computed by the caller.
        """
        last = batch[-1]
        merged: dict[str, Any]  # each key's last value in the batch, keys in order of first appearance
        if uniform:
            merged = last  # one layout throughout (the usual log): the last record has every key
        else:
            merged = {}
            deque(map(merged.update, batch), maxlen=0)
        latest, envelope = self.latest, self.envelope
        if len(latest) < self.max_keys and merged.keys() - latest.keys() - envelope:
            # A new key: its place in `latest` (and under the cap) depends on the record order.
            for step, data in zip(steps, batch, strict=True):
                self.add(step, data)
            return
        self.n += len(batch)
        if self.first_step is None:
            self.first_step = next((s for s in steps if s is not None), None)
        self.last_step = steps[-1]
        for key in merged.keys() - envelope:  # any order: every key kept is in `latest` already
            if key not in latest:  # not kept: the cap was reached before it came
                continue
            value = merged[key]
            if type(value) is float and value - value == 0:
                latest[key] = value
                continue
            for data in reversed(batch):  # the last value is not a finite float: the last one that is
                number = finite_number(data.get(key))
                if number is not None:
                    latest[key] = number
                    break
        if merged is last and "loss" in last:
            if self._loss_getter is None:  # built once: the parser keeps handing out the same key
                self._loss_getter = own_key_getter(last, "loss")
            losses = list(map(self._loss_getter, batch))
        else:
            losses = list(map(_LOSS, batch))
        if set(map(type, losses)) == {float} and math.isfinite(sum(losses)):
            keep = self.losses.maxlen or len(losses)  # only the window's worth can survive
            self.losses.extend(zip(steps[-keep:], losses[-keep:], strict=True))
            low = min(losses)
            if self.min_loss[0] is None or low < self.min_loss[0]:
                self.min_loss = (low, steps[losses.index(low)])
            return
        for step, value in zip(steps, losses, strict=True):  # a missing, null, integer or non-finite loss
            loss = finite_number(value)
            if loss is not None:
                self._loss(step, loss)
