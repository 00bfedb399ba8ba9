"""What the integrations need from torch.distributed: gathering sharded LoRA factors and
agreeing on a decision across ranks.

The callback, the trigger and the guard all decide per step on rank 0's view; under a
multi-rank run every rank must take the same branch, or a collective hangs. These helpers
run the collective only when there is more than one rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def gathered(model: Any) -> Iterator[None]:
    """Make sharded LoRA factors whole for the duration; collective, so call on every rank."""
    import torch

    units = _fsdp_outermost(model)
    if units:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # The Trainer hands callbacks the unwrapped model: its layers are FSDP units but the
        # root is outside it, so summon each outermost unit, not just the first one found.
        with contextlib.ExitStack() as stack:
            for unit in units:
                stack.enter_context(FSDP.summon_full_params(unit, writeback=False, recurse=True))
            yield
        return
    zero3 = [p for n, p in model.named_parameters() if "lora_" in n and hasattr(p, "ds_id")]
    if zero3:
        import deepspeed  # only present when ZeRO-3 is in use

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield
        return
    with torch.no_grad():
        yield


def _fsdp_outermost(model: Any) -> list[Any]:
    """FSDP1 units of `model` not nested in another unit (the model itself when it is one)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch builds without distributed
        return []
    units: list[tuple[str, Any]] = []
    for name, module in model.named_modules():  # pre-order: an ancestor comes first
        if isinstance(module, FSDP) and not any(_inside(name, outer) for outer, _ in units):
            units.append((name, module))
    return [module for _, module in units]


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name.startswith(outer + ".")


def is_sharded(model: Any) -> bool:
    """True when making the LoRA factors whole needs every rank (FSDP, DTensor, ZeRO-3)."""
    if _fsdp_outermost(model):
        return True
    return any(
        hasattr(p, "ds_id") or callable(getattr(p, "full_tensor", None))
        for n, p in model.named_parameters()
        if "lora_" in n
    )


def any_rank(flag: bool, model: Any, *, always: bool = False) -> bool:
    """`flag` OR-ed over all ranks when `model` is sharded (a collective then), else `flag`.

    Why: a snapshot of a sharded model is collective, so skipping one must be decided
    alike on every rank. Unsharded models need no agreement, and no collective is run.
    `always`: agree under any multi-rank run (a Trainer eval is collective even under DDP,
    and only rank 0 sees the snapshots that trigger one).
    """
    import torch

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    if not always and not is_sharded(model):
        return flag
    votes = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


def collective_device() -> Any:
    import torch

    if "gloo" in str(torch.distributed.get_backend()):
        return torch.device("cpu")
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and accelerator.current_accelerator() is not None:
        kind = accelerator.current_accelerator().type
        return torch.device(kind, accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())


def agree(value: float | None) -> float | None:
    """The max of `value` over the ranks (a non-finite value wins), so all decide alike."""
    import torch

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    local = -1.0 if value is None else (value if math.isfinite(value) else math.inf)
    t = torch.tensor([local], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    got = float(t.item())
    return None if got < 0 else got
