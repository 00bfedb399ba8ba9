"""Structural snapshots of live LoRA weights, on the device they train on.

A snapshot finds every PEFT LoRA layer of a model and takes two r×r Gram products per module
on the module's device (`gradience.spectrum.gram_matrices`): nothing of size out×in is
formed, and only the Grams leave the device, for batched r×r eigen-solves on the host. The
metrics come from `spectrum_metrics`, so a live snapshot and an offline audit of the saved
adapter agree to ~6 significant digits (the audit's Householder-QR route also resolves
singular values far below σ_max, which no structural metric depends on, at several times
the cost).

Several adapters on one model are keyed `<adapter>:<module path>` (one adapter: the path
alone). DoRA layers are listed: their metrics cover the low-rank B·A part, not the learned
magnitude. Devices without float64 (Apple MPS) take the Grams in float32, and the record says
so. On a CPU the snapshot's many tiny r×r products run on one thread: with several threads a
busy machine can stall each product on a descheduled worker (seconds instead of milliseconds).

Sharded training: the factors must be whole to have a spectrum. `gathered()` makes them
whole collectively (FSDP `summon_full_params`, DeepSpeed ZeRO-3 `GatheredParameters`,
DTensor `full_tensor`), so every rank must call `take_snapshot` together; only the caller
on rank 0 needs to use the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradience.integrations.distributed import gathered
from gradience.lora.reader import SAVED_PREFIX
from gradience.spectrum import gram_matrices, singular_values_from_grams, spectrum_metrics

STRUCTURAL_KEYS = ("frobenius_norm", "sigma_max", "stable_rank", "energy_rank_90", "utilization")
_MEAN_KEYS = ("stable_rank", "energy_rank_90", "utilization")
NO_FLOAT64_DEVICES = frozenset({"mps"})


@dataclass(frozen=True)
class LiveModule:
    """One LoRA layer's live factors in the (r, in) / (out, r) convention of the audit."""

    name: str
    lora_A: Any  # torch.Tensor
    lora_B: Any
    r: int
    scale: float
    adapter: str = "default"
    dora: bool = False  # a learned magnitude rescales the update; the metrics cover B·A


@dataclass(frozen=True)
class Snapshot:
    """Aggregate and per-module structural metrics, and what the snapshot cost.

    `zero_modules` (update exactly zero) are in `modules` but left out of the aggregates;
    `adapters` holds per-adapter aggregates when the model carries several; `precision` is
    "float32" where the device has no float64.
    """

    metrics: dict[str, float]
    modules: dict[str, dict[str, float]]
    cost_ms: float
    n_modules: int
    zero_modules: tuple[str, ...] = ()
    dora_modules: tuple[str, ...] = ()
    adapters: dict[str, dict[str, float]] = field(default_factory=dict)
    precision: str = "float64"

    def record_fields(self) -> dict[str, object]:
        """The fields of a structural `metrics` record (docs/telemetry.md)."""
        out: dict[str, object] = {"metrics": self.metrics, "modules": self.modules, "cost_ms": round(self.cost_ms, 3),
                                  "n_modules": self.n_modules}
        if self.zero_modules:
            out.update(n_zero_modules=len(self.zero_modules), zero_modules=list(self.zero_modules))
        if self.dora_modules:
            out.update(dora_modules=list(self.dora_modules),
                       dora_note="DoRA: metrics cover the low-rank B·A part, not the learned magnitude")
        if self.adapters:
            out["adapters"] = self.adapters
        if self.precision != "float64":
            out["precision"] = self.precision
        return out


# Path components that wrappers insert (FSDP1, activation checkpointing, torch.compile, DDP).
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def _canonical(name: str) -> str:
    """The module path as the saved adapter names it, whatever wraps the model."""
    name = ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)
    return name.removeprefix("module.").removeprefix(SAVED_PREFIX)


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
            magnitude = getattr(module, "lora_magnitude_vector", None)
            dora = magnitude is not None and adapter in magnitude
            out.append(LiveModule(_canonical(name), a, b, int(module.r[adapter]), float(scaling[adapter]),
                                  adapter, dora))
    if len({m.adapter for m in out}) > 1:  # several adapters: one key per (adapter, module)
        out = [dataclasses.replace(m, name=f"{m.adapter}:{m.name}") for m in out]
    return out


@contextlib.contextmanager
def _single_threaded(on_cpu: bool) -> Iterator[None]:
    """One torch thread for the tiny products on a CPU, the caller's count restored after."""
    import torch

    before = torch.get_num_threads()
    if on_cpu and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _grams(m: LiveModule) -> tuple[Any, Any]:
    if m.lora_A.device.type in NO_FLOAT64_DEVICES:  # no float64 there: the products in float32
        a, b = m.lora_A.float(), m.lora_B.float()
        return a @ a.T, b.T @ b
    return gram_matrices(m.lora_A, m.lora_B)


def structural_metrics(modules: list[LiveModule]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Aggregate and per-module metrics from the modules' r×r Gram matrices.

    The Gram products run on the weights' device, one pair per module (no stacked copies of
    the factors); only the small Grams cross to the host, where modules of equal rank share
    one batched eigen-solve. A module with NaN/Inf weights (or a Gram that overflows) is
    reported as NaN without touching the others.
    """
    import torch

    on_cpu = any(m.lora_A.device.type == "cpu" for m in modules)
    with torch.no_grad(), _single_threaded(on_cpu):
        grams = [_grams(m) for m in modules]
        by_device: dict[Any, list[int]] = defaultdict(list)
        for i, (g_a, _) in enumerate(grams):  # ranks differ across adapters and rank_pattern
            by_device[g_a.device, g_a.shape[-1]].append(i)
        host: list[tuple[np.ndarray, np.ndarray]] = [None] * len(modules)  # type: ignore[list-item]
        for idx in by_device.values():  # one device->host copy per device and rank (float64 on the host)
            stacked = torch.stack([torch.cat([grams[i][0], grams[i][1]]) for i in idx]).cpu().double().numpy()
            for i, both in zip(idx, stacked, strict=True):
                r = both.shape[-1]
                host[i] = (both[:r], both[r:])
    by_rank: dict[int, list[int]] = defaultdict(list)
    for i, (g_a, _) in enumerate(host):
        by_rank[g_a.shape[-1]].append(i)
    per_module: dict[str, dict[str, float]] = {}
    for idx in by_rank.values():
        g_a = np.stack([host[i][0] for i in idx])
        g_b = np.stack([host[i][1] for i in idx])
        finite = np.isfinite(g_a).all(axis=(1, 2)) & np.isfinite(g_b).all(axis=(1, 2))
        g_a[~finite], g_b[~finite] = 0.0, 0.0
        sigma = singular_values_from_grams(g_a, g_b, k=g_a.shape[-1])
        for i, s, ok in zip(idx, sigma, finite, strict=True):
            m = modules[i]
            k = min(m.r, int(m.lora_A.shape[1]), int(m.lora_B.shape[0]))
            per_module[m.name] = _module_metrics(s[:k] * abs(m.scale) if ok else s[:k] * np.nan, m)
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


def zero_modules(modules: dict[str, dict[str, float]]) -> list[str]:
    """Modules whose update is exactly zero (Frobenius norm 0): no spectrum to average."""
    return [name for name, row in modules.items() if row.get("frobenius_norm") == 0.0]


def aggregate(modules: dict[str, dict[str, float]]) -> dict[str, float]:
    """Whole-adapter values as DESIGN.md defines them.

    frobenius_norm: sqrt of the summed squared module norms; sigma_max: max over modules;
    stable_rank, energy_rank_90, utilization: means over the modules whose update is not
    exactly zero (DESIGN.md: zero modules are counted and listed, not averaged); absent
    when every update is zero, as at step 0 of a PEFT run.
    """
    if not modules:
        return {}
    rows = list(modules.values())
    zero = set(zero_modules(modules))
    live = [row for name, row in modules.items() if name not in zero]

    def col(key: str, of: list[dict[str, float]]) -> np.ndarray:
        return np.array([row[key] for row in of], dtype=np.float64)

    out = {
        "frobenius_norm": math.sqrt(float(np.sum(col("frobenius_norm", rows) ** 2))),
        "sigma_max": float(np.max(col("sigma_max", rows))),
    }
    if live:
        out.update({k: float(np.mean(col(k, live))) for k in _MEAN_KEYS})
    return out


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
    adapters = sorted({m.adapter for m in modules})
    by_adapter = {a: aggregate({m.name: per[m.name] for m in modules if m.adapter == a}) for a in adapters}
    float32 = any(m.lora_A.device.type in NO_FLOAT64_DEVICES for m in modules)
    return Snapshot(
        agg, per, (time.perf_counter() - t0) * 1000.0, len(modules), tuple(zero_modules(per)),
        tuple(m.name for m in modules if m.dora), by_adapter if len(adapters) > 1 else {},
        "float32" if float32 else "float64",
    )
