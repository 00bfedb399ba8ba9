"""Running a `Guard` inside a `transformers.Trainer`: the pre-clipping gradient-norm tap,
agreement across ranks, and the set-ups the guard refuses (and says so).
"""

from __future__ import annotations

from typing import Any

from gradience.integrations.distributed import agree, is_sharded
from gradience.integrations.guard import Guard, GuardConfig


class GradNormTap:
    """The trainable gradients' norm before clipping, taken as backward accumulates them.

    Why hooks: the Trainer clips gradients before any callback sees them, so a norm measured
    in a callback never exceeds `max_grad_norm` and hides the spike. With gradient
    accumulation the last call per parameter holds the accumulated gradient. Under DDP each
    rank sees its local gradients; `agree` combines the ranks' values.
    """

    def __init__(self, params: list[Any]) -> None:
        self._sq: dict[int, Any] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, p: Any) -> None:
        import torch

        self._sq[id(p)] = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) ** 2

    def read(self) -> float | None:
        """The norm since the last read (None when no gradient arrived); resets."""
        import torch

        if not self._sq:
            return None
        total = float(torch.stack(list(self._sq.values())).sum().sqrt())
        self._sq.clear()
        return total

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class TrainerGuard:
    """`Guard` driven by Trainer callback hooks: `begin` on the first step, `after_optimizer_step`."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.guard: Guard | None = None
        self.tap: GradNormTap | None = None
        self._begun = False

    def begin(self, args: Any, state: Any, model: Any, optimizer: Any, recorder: Any) -> None:
        """Take the first snapshot and hook the gradients; refuse setups it cannot restore."""
        if self._begun:
            return
        self._begun = True
        step = int(getattr(state, "global_step", 0) or 0)
        why = _unsupported(args, model, optimizer)
        if why:
            recorder.alert(step, "guard_disabled", f"the guard is off for this run: {why}", severity="warning")
            return
        self.guard = Guard(model, optimizer, self.config, recorder=recorder, step=step)
        self.tap = GradNormTap(self.guard.params)

    def after_optimizer_step(self, state: Any, control: Any) -> None:
        if self.guard is None or self.tap is None:
            return
        norm = agree(self.tap.read())
        if self.guard.after_step(state.global_step + 1, None, norm).stop:
            control.should_training_stop = True

    def close(self) -> None:
        if self.tap is not None:
            self.tap.close()


def _unsupported(args: Any, model: Any, optimizer: Any) -> str | None:

    if optimizer is None or model is None:
        return "the Trainer passed no optimizer or model to the callback"
    if getattr(args, "fp16", False):
        return "fp16 loss scaling makes gradient norms scaled and inf steps routine"
    if getattr(args, "deepspeed", None) or is_sharded(model):
        return "sharded parameters or optimizer state (FSDP, DeepSpeed) are not supported"
    return None
