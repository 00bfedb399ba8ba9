"""`GradienceCallback`: the flight recorder for `transformers.Trainer`.

Add it to a Trainer and it writes `<out_dir>/run.jsonl`: the run's config, train steps
(with the gradient norm of the LoRA parameters), every evaluation (also those run after
`train()` returns), and structural snapshots of the adapter every `structural_interval`
optimizer steps and at every eval step. The aggregate structural scalars are mirrored into
the Trainer's logs as `lora/<metric>` so TensorBoard or W&B plot them beside the loss.

Only world rank 0 writes; snapshots gather sharded weights collectively on every rank. A
failure inside the callback becomes an `alert` record and a warning, never an exception
in the training loop.

Example:
    >>> from gradience_hf import GradienceCallback                         # doctest: +SKIP
    >>> trainer = Trainer(..., callbacks=[GradienceCallback("runs/x", structural_interval=10)])
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gradience.errors import UsageError, require
from gradience.integrations.recorder import Recorder

require("transformers", "hf")
from transformers import TrainerCallback

_TIMING = ("runtime", "samples_per_second", "steps_per_second")
_SPLIT_RE = re.compile(r"^(?:eval_(?P<named>.+)|(?P<plain>eval|test|train|validation))$")


def split_eval_metrics(metrics: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(split, metrics without prefix, timing) from Trainer eval metrics.

    `eval_loss` → split `eval`; `eval_test_loss` → `test`; `test_loss` → `test`.
    """
    prefix = None
    for key in metrics:
        for suffix in ("_loss", "_runtime"):
            if key.endswith(suffix):
                prefix = key[: -len(suffix)]
                break
        if prefix:
            break
    if prefix is None:
        prefix = next(iter(metrics), "eval").split("_", 1)[0]
    m = _SPLIT_RE.match(prefix)
    split = (m.group("named") or m.group("plain")) if m else prefix
    values: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    for key, value in metrics.items():
        name = key[len(prefix) + 1 :] if key.startswith(prefix + "_") else key
        if name in _TIMING:
            timing[name] = value
        elif name != "epoch":
            values[name] = value
    return split, values, timing


def _guarded(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Run a hook's body; an exception becomes an alert + warning instead of killing training."""

    @functools.wraps(hook)
    def wrapper(self: GradienceCallback, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        try:
            return hook(self, args, state, control, **kwargs)
        except Exception as exc:
            self._recorder._internal_error(f"{hook.__name__} failed", exc, step=getattr(state, "global_step", None))
            return None

    return wrapper


class GradienceCallback(TrainerCallback):
    """Write a Gradience run log from a `transformers.Trainer`.

    Args:
        out_dir: folder for `run.jsonl`.
        structural_interval: structural snapshot every N optimizer steps (0: evals only).
        task_profile: e.g. `classification`, recorded in `run_start` for `check`/`monitor`.
        dataset: a name or a dict describing the data, recorded in `run_start`.
        model_name: recorded in `run_start` (default: the base model's `name_or_path`).
        allow_raw_text: keep strings over 256 characters (off: they are redacted).
        mirror_to_logs: add `lora/<metric>` scalars to the Trainer's logs.
        eval_policy: `fixed` (the Trainer's schedule); `trigger` is added by the analysis tools.
    """

    def __init__(
        self,
        out_dir: str | Path,
        structural_interval: int = 10,
        *,
        task_profile: str | None = None,
        dataset: str | Mapping[str, Any] | None = None,
        model_name: str | None = None,
        allow_raw_text: bool = False,
        mirror_to_logs: bool = True,
        eval_policy: str = "fixed",
    ) -> None:
        if eval_policy not in ("fixed",):
            raise UsageError(f"`eval_policy` must be 'fixed', got {eval_policy!r}")
        self._recorder = Recorder(out_dir, None, structural_interval=structural_interval, allow_raw_text=allow_raw_text)
        self.task_profile = task_profile
        self.dataset = {"name": dataset} if isinstance(dataset, str) else dataset
        self.model_name = model_name
        self.mirror_to_logs = mirror_to_logs
        self.eval_policy = eval_policy
        self._lora_grad_norm: float | None = None
        self._started = False

    @property
    def log_path(self) -> Path:
        return self._recorder.path

    # -- set-up ----------------------------------------------------------------------------

    def _setup(self, args: Any, state: Any, model: Any) -> None:
        """On the first event: bind the model, decide the writer rank, open the log."""
        if self._started:
            return
        self._started = True
        rec = self._recorder
        rec.model = model
        rec.is_writer = bool(getattr(state, "is_world_process_zero", True))
        step = int(getattr(state, "global_step", 0) or 0)
        if step > 0 and rec.path.is_file():
            rec.start(step, resume=True)
            return
        base = getattr(model, "base_model", model)
        inner = getattr(base, "model", base)
        name = self.model_name or getattr(getattr(inner, "config", None), "name_or_path", None)
        rec.start(
            step, model={"name": name or type(inner).__name__}, dataset=_with_num_labels(self.dataset, inner),
            task_profile=self.task_profile, eval_policy=self.eval_policy,
            training_args=_training_args(args),
        )
        self._move_before_reporters()

    def _move_before_reporters(self) -> None:
        """Run before TensorBoard/W&B callbacks so the `lora/*` scalars reach them.

        The Trainer puts reporting callbacks ahead of user callbacks; the handler calling
        us is the caller's `self`. If it cannot be found the mirror still fills the logs,
        one log event late for those integrations.
        """
        frame: Any = sys._getframe(3)
        handler = None
        for _ in range(4):
            obj = frame.f_locals.get("self") if frame else None
            if obj is not None and type(obj).__name__ == "CallbackHandler":
                handler = obj
                break
            frame = frame.f_back if frame else None
        if handler is None or self not in handler.callbacks:
            return
        callbacks = handler.callbacks
        reporters = [i for i, cb in enumerate(callbacks) if type(cb).__module__.endswith("integration_utils")]
        if reporters and callbacks.index(self) > reporters[0]:
            callbacks.remove(self)
            callbacks.insert(reporters[0], self)

    # -- Trainer hooks ---------------------------------------------------------------------

    @_guarded
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._setup(args, state, model)

    @_guarded
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # Gradients are complete (and clipped) here; measure only when this step will be logged.
        step = state.global_step + 1
        every = int(getattr(args, "logging_steps", 0) or 0)
        if model is not None and every > 0 and (step % every == 0 or step == 1):
            self._lora_grad_norm = _lora_grad_norm(model)

    @_guarded
    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._setup(args, state, model)
        # DefaultFlowCallback ran first, so `should_evaluate` already says whether this
        # step ends with an eval: the snapshot then belongs to it, at the same step.
        reason = "eval" if control.should_evaluate else "interval"
        self._recorder.maybe_snapshot(state.global_step, reason)

    @_guarded
    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:
            return
        values = {
            "loss": logs.get("loss"), "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"), "epoch": logs.get("epoch"),
            "lora_grad_norm": self._lora_grad_norm,
        }
        self._recorder.train_step(state.global_step, **{k: _scalar(v) for k, v in values.items()})
        if self.mirror_to_logs and self._recorder.last_structural:
            logs.update({f"lora/{k}": v for k, v in self._recorder.last_structural.items()})

    @_guarded
    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Mapping[str, Any] | None = None,
                    model: Any = None, **kwargs: Any) -> None:
        self._setup(args, state, model)
        if not metrics:
            return
        split, values, timing = split_eval_metrics(metrics)
        self._recorder.eval(state.global_step, split, {k: _scalar(v) for k, v in values.items()}, timing=timing)

    @_guarded
    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._recorder.snapshot(state.global_step, "final")
        self._recorder.end(state.global_step, status="ok", total_steps=state.global_step)


def _with_num_labels(dataset: Mapping[str, Any] | None, model: Any) -> dict[str, Any] | None:
    """Add a classifier's label count, so `monitor` knows the chance level."""
    config = getattr(model, "config", None)
    # The config may name the checkpoint's architecture (BertModel) rather than the head built.
    archs = [type(model).__name__, *(getattr(config, "architectures", None) or [])]
    if config is None or not any("Classification" in a for a in archs):
        return dict(dataset) if dataset else None
    return {**(dataset or {}), "num_labels": int(config.num_labels)}


def _scalar(v: Any) -> Any:
    item = getattr(v, "item", None)
    return item() if callable(item) else v


def _lora_grad_norm(model: Any) -> float | None:
    import torch

    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    value = float(total)
    return value if math.isfinite(value) else float("nan")


def _training_args(args: Any) -> dict[str, Any]:
    """A JSON-safe snapshot of TrainingArguments (the writer redacts secrets and paths)."""
    if args is None:
        return {}
    raw = args.to_dict() if hasattr(args, "to_dict") else dict(vars(args))
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out
