"""`lora_grad_norm`: the pre-clip gradient norm of the LoRA parameters.

The Trainer clips before the last hook that sees the gradients (`on_pre_optimizer_step`), so
the norm measured there is post-clip: it reads `max_grad_norm` whenever clipping fired. Clipping
scales every gradient by the same factor c = min(1, max_grad_norm / (total + 1e-6)), with total
the pre-clip norm the Trainer logs as `grad_norm`, so the pre-clip LoRA norm is the measured one
divided by c. Under FSDP / ZeRO / DTensor each rank holds a shard of the gradients: the squared
local norms are summed over the ranks (a collective: every rank measures at the same steps).
"""

from __future__ import annotations

import math
from typing import Any

from gradience.integrations.distributed import collective_device, is_sharded

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard: coef = max_norm / (total + 1e-6)


def lora_grad_norm(model: Any) -> float | None:
    """L2 norm of the current gradients of every `lora_` parameter (None when none has one).

    Collective when `model` is sharded over several ranks.
    """
    import torch

    grads = []
    for name, p in model.named_parameters():
        if "lora_" in name and p.grad is not None:
            g = p.grad
            local = getattr(g, "to_local", None)  # a DTensor's shard on this rank
            grads.append(local() if callable(local) else g)
    sq = torch.zeros((), dtype=torch.float64)
    if grads:
        norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
        sq = torch.stack([n.double().cpu() for n in norms]).square().sum()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and is_sharded(model):
        both = torch.tensor([float(sq), float(len(grads))], dtype=torch.float64, device=collective_device())
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        sq, n = both[0].cpu(), int(both[1].item())
        if n == 0:
            return None
    elif not grads:
        return None
    value = math.sqrt(float(sq)) if float(sq) >= 0 else float("nan")
    return value if math.isfinite(value) else float("nan")


def unclipped(measured: float | None, total_pre_clip: float | None, max_grad_norm: float | None) -> float | None:
    """The pre-clip value of a norm `measured` after clipping to `max_grad_norm`.

    Example:
        >>> round(unclipped(1.0, 10.0, 1.0), 4)  # clipped by 1/10: the LoRA norm was 10
        10.0
    """
    if measured is None or not math.isfinite(measured):
        return measured
    if not max_grad_norm or max_grad_norm <= 0 or total_pre_clip is None or not math.isfinite(total_pre_clip):
        return measured
    coef = min(1.0, max_grad_norm / (total_pre_clip + CLIP_EPS))
    return measured / coef
