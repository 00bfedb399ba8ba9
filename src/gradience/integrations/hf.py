"""`GradienceCallback`: the flight recorder for `transformers.Trainer`.

Add it to a Trainer and it writes `<out_dir>/run.jsonl`: the run's config, train steps
(with the gradient norm of the LoRA parameters), every evaluation (also those run after
`train()` returns), and structural snapshots of the adapter every `structural_interval`
optimizer steps and at every eval step. The aggregate structural scalars are mirrored into
the Trainer's logs as `lora/<metric>` so TensorBoard or W&B plot them beside the loss.
With `eval_policy="trigger"` it also decides when to evaluate, from those snapshots
(`trigger.py`), and `run_end` reports the eval time saved against a fixed schedule.

At train begin it also writes the redacted training arguments (`training_args.json`) and the
base model's `config.json` beside the log, so `gradience check --training-dir <out_dir>` works
for every run, and with `check_task` it runs that check there and then (`run_check.py`).

Only world rank 0 writes; snapshots gather sharded weights collectively on every rank. A
failure inside the callback becomes an `alert` record and a warning, never an exception
in the training loop.

Example:
    >>> from gradience_hf import GradienceCallback                         # doctest: +SKIP
    >>> trainer = Trainer(..., callbacks=[GradienceCallback("runs/x", structural_interval=10)])
"""

from __future__ import annotations

import functools
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gradience.errors import UsageError, require
from gradience.integrations.eval_rng import EvalRngGuard
from gradience.integrations.guard import GuardConfig
from gradience.integrations.guard_trainer import TrainerGuard
from gradience.integrations.lora_grad import lora_grad_norm, unclipped
from gradience.integrations.recorder import Recorder
from gradience.integrations.run_check import model_identity, run_check, task_of, write_check_inputs
from gradience.integrations.trigger import TriggerPolicy
from gradience.integrations.trigger_trainer import TrainerTrigger
from gradience.telemetry.schema import ENVELOPE_FIELDS

require("transformers", "hf")
from transformers import TrainerCallback

_TIMING = ("runtime", "samples_per_second", "steps_per_second")
# Trainer log keys with a name of their own in `train_step`; every other number is kept as logged.
_RENAMED = {"learning_rate": "lr"}
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
        guard: roll back to the last good snapshot on a non-finite or exploding step:
            a `GuardConfig`, or True for its defaults (off by default; see `guard.py`).
        record_paths: keep absolute paths and the host name in the log (off: dropped).
        eval_policy: `fixed` (the Trainer's schedule) or `trigger`: evaluate when the structure
            plateaus, diverges or changes regime, within a step budget (see `trigger.py`).
            With `trigger` a Trainer eval_strategy "steps" is the reference schedule the trigger
            replaces; "epoch" is overridden with a warning; "no" only adds the trigger's evals.
            Needs `structural_interval` > 0.
        trigger: the `TriggerPolicy` of `eval_policy="trigger"` (default: its defaults).
            Its savings are counted against the Trainer's `eval_steps` when its eval_strategy
            is "steps" (the schedule the trigger replaces).
        isolate_eval_rng: restore the torch RNG after every eval (on by default), so when the
            evals run does not change the training (dropout masks, batch order); see `eval_rng.py`.
        check_task: run `gradience check` for this task (`gsm8k`, `chat`, `sst2`, ...) at train
            begin: the findings are printed (logger `gradience`) and logged as `alert` records
            with code `check_<rule>`. An unknown task fails here, before training.
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
        guard: GuardConfig | bool | None = None,
        record_paths: bool = False,
        eval_policy: str = "fixed",
        trigger: TriggerPolicy | None = None,
        isolate_eval_rng: bool = True,
        check_task: str | None = None,
    ) -> None:
        if eval_policy not in ("fixed", "trigger"):
            raise UsageError(f"`eval_policy` must be 'fixed' or 'trigger', got {eval_policy!r}")
        if trigger is not None and (eval_policy != "trigger" or not isinstance(trigger, TriggerPolicy)):
            raise UsageError("`trigger` takes a TriggerPolicy, and only with eval_policy='trigger'")
        if eval_policy == "trigger" and not structural_interval:
            raise UsageError("eval_policy='trigger' reads the structural snapshots: set `structural_interval` > 0")
        if check_task is not None:
            from gradience.preflight.profiles import resolve_profile

            resolve_profile(check_task)  # an unknown task is a UsageError now, not mid-run
        self.check_task = check_task
        self._recorder = Recorder(out_dir, None, structural_interval=structural_interval, allow_raw_text=allow_raw_text,
                                  record_paths=record_paths)
        self._guard = _trainer_guard(guard)
        self.task_profile = task_profile
        self.dataset = {"name": dataset} if isinstance(dataset, str) else dataset
        self.model_name = model_name
        self.mirror_to_logs = mirror_to_logs
        self.eval_policy = eval_policy
        self._trigger: TrainerTrigger | None = None
        if eval_policy == "trigger":
            self._trigger = TrainerTrigger(trigger, agree=self._agree)
            self._recorder.on_snapshot = self._trigger.observe
        self._lora_grad_norm: float | None = None
        self._started = False
        self._eval_rng = EvalRngGuard() if isolate_eval_rng else None

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
        identity = model_identity(inner, self.model_name)
        training_args = _training_args(args)
        rec.start(
            step, model=identity, dataset=_with_num_labels(self.dataset, inner), task=task_of(model, inner),
            task_profile=self.task_profile, eval_policy=self.eval_policy,
            eval_trigger=self._trigger.policy.to_dict() if self._trigger is not None else None,
            training_args=training_args,
        )
        self._move_before_reporters()
        if rec.is_writer:
            write_check_inputs(rec.out_dir, training_args, getattr(inner, "config", None), rec.record_paths)
            if self.check_task is not None:
                run_check(self.check_task, model, rec)

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
        note = self._trigger.begin(args, state) if self._trigger is not None else None
        if note and self._recorder.is_writer:
            warnings.warn(note, stacklevel=2)

    @_guarded
    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                      **kwargs: Any) -> None:
        if self._guard is not None:  # before the first forward, so its gradients are measured
            self._setup(args, state, model)
            self._guard.begin(args, state, model, optimizer, self._recorder)

    @_guarded
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # Gradients are complete and already clipped here; measure only when this step will
        # be logged, and undo the clip in `on_log`, where the pre-clip total norm is known.
        step = state.global_step + 1
        every = int(getattr(args, "logging_steps", 0) or 0)
        if model is not None and every > 0 and (step % every == 0 or step == 1):
            self._lora_grad_norm = lora_grad_norm(model)

    @_guarded
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # After optimizer.step(), before zero_grad and the scheduler: a bad step is undone here.
        if self._guard is not None:
            self._guard.after_optimizer_step(state, control)

    @_guarded
    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._setup(args, state, model)
        if self._trigger is not None:  # evals owed whatever the snapshot says: final, max_spacing, deferred
            self._trigger.step_end(state, control, self._recorder)
        # DefaultFlowCallback ran first, so `should_evaluate` already says whether this
        # step ends with an eval: the snapshot then belongs to it, at the same step.
        reason = "eval" if control.should_evaluate else "interval"
        self._recorder.maybe_snapshot(state.global_step, reason)
        if self._trigger is not None:  # what the fresh snapshot says
            self._trigger.step_end(state, control, self._recorder)
        if self._eval_rng is not None and control.should_evaluate:
            self._eval_rng.save(state.global_step)

    @_guarded
    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._trigger is not None:
            self._trigger.epoch_end(state, control)

    @_guarded
    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:
            return
        # Every number the Trainer or TRL logs (entropy, num_tokens, mean_token_accuracy, ...).
        values = {_RENAMED.get(k, k): _scalar(v) for k, v in logs.items() if not k.startswith("lora/")}
        values = {k: v for k, v in values.items() if _is_number(v) and k not in ENVELOPE_FIELDS}
        total = values.get("grad_norm")
        values["lora_grad_norm"] = unclipped(self._lora_grad_norm, total if isinstance(total, float) else None,
                                             getattr(args, "max_grad_norm", None))
        self._recorder.train_step(state.global_step, **values)
        if self.mirror_to_logs and self._recorder.last_structural:
            logs.update({f"lora/{k}": v for k, v in self._recorder.last_structural.items()})

    @_guarded
    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Mapping[str, Any] | None = None,
                    model: Any = None, **kwargs: Any) -> None:
        self._setup(args, state, model)
        if self._eval_rng is not None:
            self._eval_rng.restore(state.global_step)
        if not metrics:
            return
        split, values, timing = split_eval_metrics(metrics)
        if self._trigger is not None:
            self._trigger.evaluated(state.global_step, timing.get("runtime"))
        self._recorder.eval(state.global_step, split, {k: _scalar(v) for k, v in values.items()}, timing=timing)

    @_guarded
    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._guard is not None:
            self._guard.close()
        self._recorder.snapshot(state.global_step, "final")
        savings = {"eval_savings": self._trigger.summary(state.global_step)} if self._trigger is not None else {}
        self._recorder.end(state.global_step, status="ok", total_steps=state.global_step, **savings)

    def _agree(self, flag: bool) -> bool:
        """A Trainer eval is collective, but only rank 0 sees the snapshots: OR over ranks."""
        from gradience.integrations.distributed import any_rank

        return any_rank(flag, self._recorder.model, always=True)


def _trainer_guard(guard: GuardConfig | bool | None) -> TrainerGuard | None:
    if guard is None or guard is False:
        return None
    if guard is True:
        return TrainerGuard(GuardConfig())
    if isinstance(guard, GuardConfig):
        return TrainerGuard(guard)
    raise UsageError(f"`guard` must be a GuardConfig, True or None, got {guard!r}")


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
    return item() if callable(item) and getattr(v, "numel", lambda: 1)() == 1 else v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _training_args(args: Any) -> dict[str, Any]:
    """A JSON-safe snapshot of TrainingArguments (the writer redacts secrets and paths)."""
    if args is None:
        return {}
    raw = args.to_dict() if hasattr(args, "to_dict") else dict(vars(args))
    world = getattr(args, "world_size", None)  # not in to_dict(); `check` needs it for the batch size
    if isinstance(world, int) and "world_size" not in raw:
        raw["world_size"] = world
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out
