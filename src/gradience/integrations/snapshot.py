"""Structural snapshots of live LoRA weights, on the device they train on.

A snapshot finds every PEFT LoRA layer of a model, stacks the factors of modules with equal
shapes, and runs the one QR core of `gradience.spectrum` on each stack: a few batched
(out×r) QRs instead of one per module, and nothing of size out×in. Only the r singular
values per module leave the device; the metrics come from `spectrum_metrics`, so a live
snapshot and an offline audit of the saved adapter agree.

Sharded training: the factors must be whole to have a spectrum. `gathered()` makes them
whole collectively (FSDP `summon_full_params`, DeepSpeed ZeRO-3 `GatheredParameters`,
DTensor `full_tensor`), so every rank must call `take_snapshot` together; only the caller
on rank 0 needs to use the result.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradience.adapter import SAVED_PREFIX
from gradience.spectrum import core_singular_values, spectrum_metrics

STRUCTURAL_KEYS = ("frobenius_norm", "sigma_max", "stable_rank", "energy_rank_90", "utilization")


@dataclass(frozen=True)
class LiveModule:
    """One LoRA layer's live factors in the (r, in) / (out, r) convention of the audit."""

    name: str
    lora_A: Any  # torch.Tensor
    lora_B: Any
    r: int
    scale: float


@dataclass(frozen=True)
class Snapshot:
    """Aggregate and per-module structural metrics, and what the snapshot cost."""

    metrics: dict[str, float]
    modules: dict[str, dict[str, float]]
    cost_ms: float
    n_modules: int


def _canonical(name: str) -> str:
    return name.removeprefix(SAVED_PREFIX).removeprefix("module.")


def _full(t: Any) -> Any:
    """A DTensor's whole value (collective); plain tensors pass through."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def lora_modules(model: Any, adapter_name: str | None = None) -> list[LiveModule]:
    """The LoRA layers of a PEFT model, by their base-model module path.

    Args:
        model: a `PeftModel` (or any module tree holding PEFT `LoraLayer`s).
        adapter_name: which adapter to read; default: each layer's active adapter.
    """
    out = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        emb_a = getattr(module, "lora_embedding_A", None)
        scaling = getattr(module, "scaling", None)
        if scaling is None or (not lora_a and not emb_a):
            continue
        names = [adapter_name] if adapter_name else list(getattr(module, "active_adapters", []) or scaling)
        for adapter in names:
            if lora_a is not None and adapter in lora_a:
                a, b = lora_a[adapter].weight, module.lora_B[adapter].weight
                a, b = _full(a).detach(), _full(b).detach()
                if a.ndim > 2:  # convolutions: flatten the kernel into the input side
                    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            elif emb_a is not None and adapter in emb_a:
                # PEFT applies (B @ A).T for embeddings: transpose into (r, in) / (out, r).
                a = _full(module.lora_embedding_B[adapter]).detach().T
                b = _full(emb_a[adapter]).detach().T
            else:
                continue
            out.append(LiveModule(_canonical(name), a, b, int(module.r[adapter]), float(scaling[adapter])))
    return out


@contextlib.contextmanager
def gathered(model: Any) -> Iterator[None]:
    """Make sharded LoRA factors whole for the duration; collective, so call on every rank."""
    import torch

    fsdp = _fsdp_root(model)
    if fsdp is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(fsdp, writeback=False, recurse=True):
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


def _fsdp_root(model: Any) -> Any:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch builds without distributed
        return None
    for module in model.modules():
        if isinstance(module, FSDP):
            return module
    return None


def structural_metrics(modules: list[LiveModule]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Aggregate and per-module metrics; modules of equal shape share one batched QR call."""
    import torch

    groups: dict[tuple[Any, ...], list[LiveModule]] = defaultdict(list)
    for m in modules:
        groups[(tuple(m.lora_A.shape), tuple(m.lora_B.shape), m.lora_A.device)].append(m)
    per_module: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for group in groups.values():
            a = torch.stack([m.lora_A for m in group])
            b = torch.stack([m.lora_B for m in group])
            # A diverged module must not poison its batch: zero it for the QR, report NaN.
            finite = torch.isfinite(a).flatten(1).all(1) & torch.isfinite(b).flatten(1).all(1)
            if not bool(finite.all()):
                keep = finite.view(-1, 1, 1)
                a, b = torch.where(keep, a, 0.0), torch.where(keep, b, 0.0)
            sigma = core_singular_values(a, b).cpu().numpy()  # (n, k): the only device->host copy
            for m, s, ok in zip(group, sigma, finite.tolist(), strict=True):
                per_module[m.name] = _module_metrics(s * abs(m.scale) if ok else s * np.nan, m)
    ordered = {m.name: per_module[m.name] for m in modules}
    return aggregate(ordered), ordered


def _module_metrics(sigma: np.ndarray, m: LiveModule) -> dict[str, float]:
    shape = (int(m.lora_B.shape[0]), int(m.lora_A.shape[1]))
    if not np.isfinite(sigma).all():
        return {k: float("nan") for k in STRUCTURAL_KEYS}
    sm = spectrum_metrics(sigma, m.r, shape)
    return {
        "frobenius_norm": sm.frobenius_norm, "sigma_max": sm.sigma_max, "stable_rank": sm.stable_rank,
        "energy_rank_90": float(sm.energy_rank_90), "utilization": sm.utilization,
    }


def aggregate(modules: dict[str, dict[str, float]]) -> dict[str, float]:
    """Whole-adapter values as DESIGN.md defines them.

    frobenius_norm: sqrt of the summed squared module norms; sigma_max: max over modules;
    stable_rank, energy_rank_90, utilization: means over modules.
    """
    if not modules:
        return {}
    rows = list(modules.values())

    def col(key: str) -> np.ndarray:
        return np.array([row[key] for row in rows], dtype=np.float64)

    return {
        "frobenius_norm": math.sqrt(float(np.sum(col("frobenius_norm") ** 2))),
        "sigma_max": float(np.max(col("sigma_max"))),
        "stable_rank": float(np.mean(col("stable_rank"))),
        "energy_rank_90": float(np.mean(col("energy_rank_90"))),
        "utilization": float(np.mean(col("utilization"))),
    }


def take_snapshot(model: Any, adapter_name: str | None = None, compute: bool = True) -> Snapshot | None:
    """Gather (collectively), then measure the live adapter; `compute=False` on non-zero ranks."""
    t0 = time.perf_counter()
    with gathered(model):
        modules = lora_modules(model, adapter_name)  # collective for DTensor: every rank calls it
        if not compute:
            return None
        if not modules:
            return Snapshot({}, {}, 0.0, 0)
        agg, per = structural_metrics(modules)
    return Snapshot(agg, per, (time.perf_counter() - t0) * 1000.0, len(modules))
