"""Guard: roll a LoRA run back to its last good state when a step diverges (opt-in).

While training is healthy the guard keeps one in-memory copy of the trainable parameters
(the LoRA factors, plus any `modules_to_save`) and of the optimizer state, refreshed every
`snapshot_every` good steps, on the device they live on. A step is bad when its loss or
gradient norm is not finite, or when its gradient norm exceeds `spike_factor` times the
median of the last `median_window` good steps. After a bad step the guard copies the
snapshot back into the parameters in place (so the optimizer's references stay valid) and
loads the snapshot's optimizer state (Adam moments and step count included). The step
counter, the learning-rate schedule and the data order go on: the next batches are new.

Cooldown: after a rollback, no snapshot is taken until `cooldown` consecutive good steps
have passed, so the state kept next is one the run has proven healthy past. Rollbacks are
not paused: a bad step inside the cooldown rolls back again, to the same snapshot.

Budget: a bad step that finds `max_rollbacks` rollbacks already within the last
`rollback_window` steps exhausts the guard. `on_exhausted="stop"` restores the last good
snapshot one final time and asks training to stop (the Trainer's `should_training_stop`;
`GuardDecision.stop` in a plain loop), so what gets saved is the last good state.
`on_exhausted="continue"` leaves the weights alone and switches the guard off for the
rest of the run. Every rollback and the exhaustion are `alert` records.

`GuardPolicy` is the decision alone (no torch); `Guard` applies it to a model and an
optimizer; `TrainerGuard` is the glue `GradienceCallback(guard=...)` uses.

Example:
    >>> guard = Guard(model, opt, GuardConfig(snapshot_every=20), recorder=rec)  # doctest: +SKIP
    >>> for step in range(1, n + 1):                                             # doctest: +SKIP
    ...     loss = compute_loss(); loss.backward()
    ...     norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # the pre-clip norm
    ...     opt.step(); opt.zero_grad()
    ...     if guard.after_step(step, loss.item(), norm.item()).stop:
    ...         break
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gradience.errors import UsageError, require

NONE = "none"
SNAPSHOT = "snapshot"
ROLLBACK = "rollback"
STOP = "stop"
GIVE_UP = "give_up"
ON_EXHAUSTED = ("stop", "continue")

ALERT_CODES = {ROLLBACK: "guard_rollback", STOP: "guard_stop", GIVE_UP: "guard_exhausted"}


@dataclass(frozen=True)
class GuardConfig:
    """When the guard snapshots, what counts as a bad step, and how often it may intervene."""

    snapshot_every: int = field(default=10, metadata={"help": "Refresh the snapshot every N good steps."})
    spike_factor: float = field(
        default=10.0, metadata={"help": "Bad when grad norm > factor x median of recent good norms."}
    )
    median_window: int = field(default=50, metadata={"help": "Good steps in the running median."})
    min_history: int = field(default=5, metadata={"help": "Good steps needed before spikes are judged."})
    cooldown: int = field(default=10, metadata={"help": "Good steps after a rollback before snapshots resume."})
    max_rollbacks: int = field(default=3, metadata={"help": "Rollbacks allowed within `rollback_window`."})
    rollback_window: int = field(default=200, metadata={"help": "Steps (ending at the current one) counted."})
    on_exhausted: str = field(default="stop", metadata={"help": "'stop' the run or 'continue' unguarded."})

    def __post_init__(self) -> None:
        for name in ("snapshot_every", "median_window", "min_history", "max_rollbacks", "rollback_window"):
            _check_int(name, getattr(self, name), 1)
        _check_int("cooldown", self.cooldown, 0)
        factor = self.spike_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1.0:
            raise UsageError(f"`spike_factor` must be a number > 1, got {factor!r}")
        if self.min_history > self.median_window:
            raise UsageError(
                f"`min_history` ({self.min_history}) cannot exceed `median_window` ({self.median_window})"
            )
        if self.on_exhausted not in ON_EXHAUSTED:
            raise UsageError(f"`on_exhausted` must be 'stop' or 'continue', got {self.on_exhausted!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class GuardDecision:
    """What the guard did after one step; `action` is none, snapshot, rollback, stop or give_up."""

    step: int
    action: str = NONE
    reason: str | None = None  # nonfinite_loss, nonfinite_grad_norm, grad_norm_spike
    message: str = ""
    restored_to: int | None = None  # the snapshot's step, after rollback or stop
    grad_norm: float | None = None
    threshold: float | None = None

    @property
    def stop(self) -> bool:
        """True when the caller should end training now."""
        return self.action == STOP


class GuardPolicy:
    """The guard's decisions from (step, loss, grad norm) alone; no tensors involved.

    It assumes each decision is carried out: after `snapshot` the snapshot is at `step`,
    after `rollback` the weights are back at `restored_to`.

    Args:
        config: thresholds and budget.
        start_step: the step of the first snapshot (taken before training starts).
    """

    def __init__(self, config: GuardConfig | None = None, start_step: int = 0) -> None:
        self.config = config or GuardConfig()
        self.snapshot_step = start_step
        self.good_norms: deque[float] = deque(maxlen=self.config.median_window)
        self.rollbacks: list[int] = []
        self.cooldown_left = 0
        self.active = True

    def threshold(self) -> float | None:
        """The spike threshold now, or None while fewer than `min_history` good norms are known."""
        if len(self.good_norms) < self.config.min_history:
            return None
        return self.config.spike_factor * statistics.median(self.good_norms)

    def rollbacks_in_window(self, step: int) -> int:
        return sum(1 for s in self.rollbacks if s > step - self.config.rollback_window)

    def decide(self, step: int, loss: float | None = None, grad_norm: float | None = None) -> GuardDecision:
        """Judge the step just taken and say what to do about it."""
        if not self.active:
            return GuardDecision(step, grad_norm=grad_norm)
        threshold = self.threshold()
        bad = _diagnose(loss, grad_norm, threshold)
        if bad is None:
            return self._good(step, grad_norm, threshold)
        reason, what = bad

        def verdict(action: str, message: str, restored_to: int | None) -> GuardDecision:
            return GuardDecision(step, action, reason, message, restored_to, grad_norm, threshold)

        used = self.rollbacks_in_window(step)
        if used >= self.config.max_rollbacks:
            self.active = False
            budget = (f"{used} rollbacks within the last {self.config.rollback_window} steps "
                      f"(max_rollbacks={self.config.max_rollbacks})")  # fmt: skip
            if self.config.on_exhausted == "stop":
                message = (f"step {step}: {what}; {budget}: restored the snapshot of step "
                           f"{self.snapshot_step} and stopped training")  # fmt: skip
                return verdict(STOP, message, self.snapshot_step)
            message = f"step {step}: {what}; {budget}: the guard no longer intervenes in this run"
            return verdict(GIVE_UP, message, None)
        self.rollbacks.append(step)
        self.cooldown_left = self.config.cooldown
        message = (f"step {step}: {what}; rolled the trainable weights and optimizer state back "
                   f"to step {self.snapshot_step}")  # fmt: skip
        return verdict(ROLLBACK, message, self.snapshot_step)

    def _good(self, step: int, grad_norm: float | None, threshold: float | None) -> GuardDecision:
        if grad_norm is not None:
            self.good_norms.append(grad_norm)
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            return GuardDecision(step, grad_norm=grad_norm, threshold=threshold)
        if step - self.snapshot_step >= self.config.snapshot_every:
            self.snapshot_step = step
            return GuardDecision(step, SNAPSHOT, grad_norm=grad_norm, threshold=threshold)
        return GuardDecision(step, grad_norm=grad_norm, threshold=threshold)


def _diagnose(loss: float | None, grad_norm: float | None, threshold: float | None) -> tuple[str, str] | None:
    """(reason, description) of a bad step, or None for a good one."""
    if loss is not None and not math.isfinite(loss):
        return "nonfinite_loss", f"training loss is {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return "nonfinite_grad_norm", f"gradient norm is {grad_norm}"
    if grad_norm is not None and threshold is not None and grad_norm > threshold:
        return "grad_norm_spike", f"gradient norm {grad_norm:.4g} exceeds {threshold:.4g} (factor x median)"
    return None


# -- the state copy ----------------------------------------------------------------------


@dataclass
class GuardSnapshot:
    """Copies of the trainable parameters and the optimizer state at `step`."""

    step: int
    params: list[Any]  # torch.Tensor, one per trainable parameter, same order
    optimizer_state: dict[str, Any]


def _clone(obj: Any) -> Any:
    """A copy of a state dict in which every tensor is a fresh tensor (no aliasing)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def take_state(params: list[Any], optimizer: Any, step: int) -> GuardSnapshot:
    """Copy `params` and `optimizer.state_dict()` (which holds references, hence the clone)."""
    import torch

    with torch.no_grad():
        return GuardSnapshot(step, [p.detach().clone() for p in params], _clone(optimizer.state_dict()))


def restore_state(snapshot: GuardSnapshot, params: list[Any], optimizer: Any) -> None:
    """Put `snapshot` back: parameters in place, optimizer state through `load_state_dict`.

    The optimizer gets a fresh clone (it keeps the tensors it is given and updates them in
    place, which would corrupt the snapshot). Its current hyperparameters (`lr`, ...) are
    kept: the learning-rate schedule is not rewound.
    """
    import torch

    with torch.no_grad():
        for p, saved in zip(params, snapshot.params, strict=True):
            p.copy_(saved)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(_clone(snapshot.optimizer_state))
    for group, values in zip(optimizer.param_groups, hyper, strict=True):
        group.update(values)


def grad_norm_of(params: list[Any]) -> float | None:
    """The global L2 norm of the gradients present on `params` (None when there are none)."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def trainable_params(model: Any) -> list[Any]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    item = getattr(value, "item", None)
    return float(item() if callable(item) else value)


class Guard:
    """Snapshots and rollbacks for a plain PyTorch loop: call `after_step` after each step.

    Args:
        model: the model being trained; its `requires_grad` parameters are guarded.
        optimizer: the optimizer stepping them (its `state_dict` is snapshotted too).
        config: a `GuardConfig` (default thresholds when omitted).
        recorder: a `Recorder`; rollbacks and exhaustion become its `alert` records.
        step: the current step; the first snapshot is taken now, at this step.

    Raises:
        UsageError: the model has no trainable parameter.
    """

    def __init__(self, model: Any, optimizer: Any, config: GuardConfig | None = None, *,
                 recorder: Any = None, step: int = 0) -> None:  # fmt: skip
        require("torch", "hf")
        self.params = trainable_params(model)
        if not self.params:
            raise UsageError("the guard found no trainable parameter (requires_grad) in the model")
        self.optimizer = optimizer
        self.policy = GuardPolicy(config, start_step=step)
        self.recorder = recorder
        self.snapshot = take_state(self.params, optimizer, step)

    @property
    def config(self) -> GuardConfig:
        return self.policy.config

    def after_step(self, step: int, loss: Any = None, grad_norm: Any = None) -> GuardDecision:
        """Judge the optimizer step just taken; snapshot, roll back or stop as the policy says.

        Args:
            step: the step just finished (1 for the first).
            loss: its loss (a float or a 0-d tensor); None when unknown.
            grad_norm: its gradient norm before clipping (`clip_grad_norm_` returns it);
                None: measured now from the gradients still on the parameters, if any.
        """
        norm = _as_float(grad_norm)
        if norm is None:
            norm = grad_norm_of(self.params)
        decision = self.policy.decide(step, _as_float(loss), norm)
        if decision.action == SNAPSHOT:
            self.snapshot = take_state(self.params, self.optimizer, step)
        elif decision.action in (ROLLBACK, STOP):
            restore_state(self.snapshot, self.params, self.optimizer)
        self._report(decision, _as_float(loss))
        return decision

    def _report(self, decision: GuardDecision, loss: float | None) -> None:
        code = ALERT_CODES.get(decision.action)
        if code is None or self.recorder is None:
            return
        severity = "warning" if decision.action == ROLLBACK else "critical"
        self.recorder.alert(
            decision.step, code, decision.message, severity=severity, reason=decision.reason,
            restored_to_step=decision.restored_to, loss=loss, grad_norm=decision.grad_norm,
            threshold=decision.threshold, rollbacks_in_window=self.policy.rollbacks_in_window(decision.step),
        )


# -- transformers.Trainer glue -------------------------------------------------------------
