"""The flight recorder for any PyTorch training loop.

`Recorder` writes the records of docs/telemetry.md: `run_start`, `train_step`, `eval`,
structural `metrics` snapshots (every `structural_interval` steps and at every eval step,
each saying why it was taken), `alert` and `run_end`. The Trainer callback is a thin layer
over it, so a custom loop and a Trainer run produce the same log.

It never raises into training once started: an internal failure becomes an `alert` record
and a warning. Misconfiguration fails at construction, before any compute is spent.

Example:
    >>> rec = Recorder("runs/mine", model, structural_interval=10)      # doctest: +SKIP
    >>> rec.start(model_name="my-model", dataset="my-data")            # doctest: +SKIP
    >>> for step in range(1, 101):                                      # doctest: +SKIP
    ...     loss = train_one_step()
    ...     rec.train_step(step, loss=loss.item(), lr=sched.get_last_lr()[0])
    >>> rec.eval(100, "test", {"loss": 0.41, "accuracy": 0.83})          # doctest: +SKIP
    >>> rec.end()                                                       # doctest: +SKIP
"""

from __future__ import annotations

import math
import platform
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gradience import __version__
from gradience.errors import UsageError
from gradience.telemetry import RunWriter

LOG_NAME = "run.jsonl"
_MAX_INTERNAL_ERRORS = 5


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a run (those that are imported)."""
    import sys

    out = {"gradience": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "numpy"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = str(getattr(mod, "__version__", "unknown"))
    return out


def lora_config_of(model: Any) -> dict[str, Any] | None:
    """The active adapter's LoRA settings from a PeftModel, JSON-safe."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    name = getattr(model, "active_adapter", None) or next(iter(configs))
    cfg = configs.get(name) if isinstance(configs, Mapping) else None
    if cfg is None:
        return None
    keys = ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules",
            "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out", "task_type", "bias")
    out: dict[str, Any] = {"adapter_name": name}
    for k in keys:
        v = getattr(cfg, k, None)
        if isinstance(v, set):
            v = sorted(v)
        if k in ("peft_type", "task_type") and v is not None:
            v = str(getattr(v, "value", v))  # PEFT's str enums: "LORA", not "PeftType.LORA"
        out[k] = v
    return out


def count_params(model: Any) -> dict[str, int]:
    total = trainable = 0
    for p in model.parameters():
        n = int(p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return {"n_params": total, "trainable_params": trainable}


class Recorder:
    """Writes a run's telemetry and takes structural snapshots of its LoRA weights.

    Args:
        out_dir: folder for `run.jsonl` (created if missing).
        model: the PEFT model being trained (None: no structural snapshots).
        structural_interval: take a snapshot every this many optimizer steps (0: only at evals).
        allow_raw_text: keep strings over 256 characters in the log.
        record_paths: keep absolute paths and the host name (off: a path becomes its last
            component, the host name `<host>`).
        is_writer: False on ranks other than 0: they join collective gathers, write nothing.
        resume: continue an existing log (writes `run_resume`).
        on_snapshot: called with (step, reason, aggregate metrics) after each snapshot.
    """

    def __init__(
        self,
        out_dir: str | Path,
        model: Any = None,
        *,
        structural_interval: int = 10,
        allow_raw_text: bool = False,
        record_paths: bool = False,
        is_writer: bool = True,
        on_snapshot: Callable[[int, str, dict[str, float]], None] | None = None,
    ) -> None:
        if isinstance(structural_interval, bool) or not isinstance(structural_interval, int) or structural_interval < 0:
            raise UsageError(f"`structural_interval` must be an integer >= 0, got {structural_interval!r}")
        if not isinstance(out_dir, (str, Path)) or not str(out_dir):
            raise UsageError(f"`out_dir` must be a folder path, got {out_dir!r}")
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOG_NAME
        self.model = model
        self.structural_interval = structural_interval
        self.allow_raw_text = allow_raw_text
        self.record_paths = record_paths
        self.is_writer = is_writer
        self.on_snapshot = on_snapshot
        self.last_snapshot_step: int | None = None
        self.last_structural: dict[str, float] = {}
        self._last_fields: dict[str, Any] = {}
        self._last_reason: str | None = None
        self._writer: RunWriter | None = None
        self._errors = 0
        self._ended = False

    # -- the log ---------------------------------------------------------------------------

    def _open(self, resume: bool) -> RunWriter:
        if self._writer is None or self._writer.closed:
            exists = self.path.is_file() and self.path.stat().st_size > 0
            if exists and not resume:
                self._rotate()
            self._writer = RunWriter(self.path, resume=exists and resume, allow_raw_text=self.allow_raw_text,
                                     record_paths=self.record_paths)
        return self._writer

    def _rotate(self) -> None:
        """A fresh run never appends to, or overwrites, an older run's log: move it aside."""
        k = 1
        while (old := self.path.with_name(f"run.prev-{k}.jsonl")).exists():
            k += 1
        self.path.rename(old)
        warnings.warn(f"gradience: {self.path} held an earlier run; moved it to {old.name}", stacklevel=3)

    def write(self, event: str, step: int | None, **fields: Any) -> dict[str, Any] | None:
        """Write one record (rank 0 only); internal failures become a warning, never an exception."""
        if not self.is_writer:
            return None
        try:
            return self._open(resume=True).write(event, step, **fields)
        except Exception as exc:
            self._internal_error(f"cannot write {event} record", exc, log=False)
            return None

    # -- events ----------------------------------------------------------------------------

    def start(self, step: int = 0, *, resume: bool = False, **fields: Any) -> None:
        """`run_start` for a new run, or `run_resume` when continuing one at `step`."""
        if not self.is_writer:
            return
        try:
            self._open(resume=resume)
        except Exception as exc:
            self._internal_error("cannot open the run log", exc, log=False)
            return
        self._ended = False
        if resume and self._writer is not None and self._writer.seq > 0:
            self.write("run_resume", step, resumed_from_step=step)
            return
        model_info = count_params(self.model) if self.model is not None else {}
        model_info.update(fields.pop("model", {}) or {})
        self.write(
            "run_start", step, model=model_info, lora=lora_config_of(self.model),
            structural_interval=self.structural_interval, versions=library_versions(), **fields,
        )

    def train_step(self, step: int, **values: Any) -> None:
        """A `train_step` record; non-finite losses also raise an `alert` record."""
        loss = values.get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            self.alert(step, "nonfinite_loss", f"training loss is {loss} at step {step}", severity="critical")
        self.write("train_step", step, **values)

    def maybe_snapshot(self, step: int, reason: str = "interval") -> None:
        """Snapshot if `step` is on the structural interval (or `reason` is not interval)."""
        due = self.structural_interval > 0 and step % self.structural_interval == 0
        if reason != "interval" or due:
            self.snapshot(step, reason)

    def snapshot(self, step: int, reason: str) -> dict[str, float] | None:
        """Structural metrics of the live adapter at `step`; at most one record per step.

        Collective under sharded training: every rank must call it at the same step.
        """
        if self.model is None:
            return None
        if self.last_snapshot_step == step:
            # An eval the schedule did not announce (eval_strategy="epoch", a manual
            # `evaluate()`) at a step already snapshotted: the weights are the same, so the
            # eval gets its same-step record by copying that snapshot, labelled `eval`.
            if reason == "eval" and self._last_reason not in (None, "eval") and self._last_fields:
                copy = {k: v for k, v in self._last_fields.items() if k != "cost_ms"}
                source, self._last_reason = self._last_reason, "eval"
                self.write("metrics", step, kind="structural", reason="eval", copied_from=source, **copy)
            return None
        from gradience.integrations.distributed import any_rank
        from gradience.integrations.snapshot import take_snapshot

        # Only rank 0 computes, so only it sees some failures; if it alone skipped a gather
        # the others joined, they would hang. So the step is spent even when the snapshot
        # fails, and under sharding the ranks agree on whether snapshots are disabled.
        self.last_snapshot_step = step
        if any_rank(self._errors >= _MAX_INTERNAL_ERRORS, self.model):
            return None
        try:
            snap = take_snapshot(self.model, compute=self.is_writer)
        except Exception as exc:
            self._internal_error(f"structural snapshot failed at step {step}", exc, step=step)
            return None
        if snap is None or not snap.modules:
            return None
        self.last_structural = snap.metrics
        fields = snap.record_fields()
        self._last_fields, self._last_reason = fields, reason
        self.write("metrics", step, kind="structural", reason=reason, **fields)
        if self.on_snapshot is not None:
            self.on_snapshot(step, reason, snap.metrics)
        return snap.metrics

    def eval(self, step: int, split: str, metrics: Mapping[str, Any], **fields: Any) -> None:
        """An `eval` record (with `ppl` = exp(loss) when a loss is given) and its snapshot."""
        values = dict(metrics)
        loss = values.get("loss")
        if isinstance(loss, (int, float)) and "ppl" not in values:
            values["ppl"] = math.exp(loss) if loss < 700 else float("inf")
        self.snapshot(step, "eval")
        self.write("eval", step, split=split, metrics=values, **fields)

    def alert(self, step: int | None, code: str, message: str, severity: str = "warning", **fields: Any) -> None:
        self.write("alert", step, severity=severity, code=code, message=message, **fields)

    def recommend(self, step: int | None, code: str, message: str, **fields: Any) -> None:
        self.write("recommendation", step, code=code, message=message, **fields)

    def end(self, step: int | None = None, status: str = "ok", **fields: Any) -> None:
        """`run_end` once per run, then close the file (a later record reopens it)."""
        if self._ended:
            return
        self._ended = True
        self.write("run_end", step, status=status, **fields)
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        status = "ok" if exc_type is None else ("aborted" if issubclass(exc_type, KeyboardInterrupt) else "error")
        self.end(self.last_snapshot_step, status=status, **({"error": repr(exc)} if exc is not None else {}))

    # -- failures --------------------------------------------------------------------------

    def _internal_error(self, what: str, exc: BaseException, step: int | None = None, log: bool = True) -> None:
        self._errors += 1
        message = f"{what}: {type(exc).__name__}: {exc}"
        if self._errors >= _MAX_INTERNAL_ERRORS:
            message += " (structural snapshots are now disabled for this run)"
        warnings.warn(f"gradience: {message}", stacklevel=3)
        if log:
            self.alert(step, "gradience_internal_error", message, severity="warning")
