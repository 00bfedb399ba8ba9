"""Adapters with a known spectrum, written to disk the way PEFT lays them out.

ΔW = s · B · A is built as U · diag(σ) · Vᵀ with random orthonormal U, V, and split
between B and A through a random well-conditioned r×r matrix, so the factors are not
themselves orthogonal and the QR core has real work to do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

PREFIX = "base_model.model."


@dataclass
class ModuleSpec:
    out_features: int
    in_features: int
    sigma: Sequence[float]  # singular values of the *scaled* update s·B·A
    embedding: bool = False


@dataclass
class AdapterSpec:
    modules: Mapping[str, ModuleSpec]
    r: int = 8
    lora_alpha: float = 16.0
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    extra_config: Mapping[str, Any] = field(default_factory=dict)

    def rank(self, name: str) -> int:
        for k, v in self.rank_pattern.items():  # test specs use exact suffix keys
            if name == k or name.endswith("." + k):
                return v
        return self.r

    def scale(self, name: str) -> float:
        alpha = self.lora_alpha
        for k, v in self.alpha_pattern.items():
            if name == k or name.endswith("." + k):
                alpha = v
                break
        r = self.rank(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def factors(
    out_features: int, in_features: int, sigma: Sequence[float], r: int, scale: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A: (r, in), B: (out, r) and σ(scale · B @ A) == sigma (padded with zeros)."""
    rng = np.random.default_rng(seed)
    s = np.zeros(r)
    s[: len(sigma)] = sigma
    u = orthonormal(rng, out_features, r)
    v = orthonormal(rng, in_features, r)
    # A random, well-conditioned mixing so that neither factor is orthogonal.
    g = np.eye(r) + 0.3 * rng.standard_normal((r, r)) / math.sqrt(r)
    b = (u * s) @ g / scale
    a = np.linalg.solve(g, v.T)
    return a, b


def write_adapter(
    directory: Path, spec: AdapterSpec, dtype: Any = np.float64, seed: int = 0
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors for `spec`; returns the dir."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for i, (name, m) in enumerate(spec.modules.items()):
        r = spec.rank(name)
        a, b = factors(m.out_features, m.in_features, m.sigma, r, spec.scale(name), seed + i)
        if m.embedding:
            # PEFT's layout: lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r),
            # update (B @ A).T of shape (num_embeddings, dim).
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = np.ascontiguousarray(b.T.astype(dtype))
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = np.ascontiguousarray(a.T.astype(dtype))
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.astype(dtype))
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.astype(dtype))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "r": spec.r, "lora_alpha": spec.lora_alpha,
        "use_rslora": spec.use_rslora, "rank_pattern": dict(spec.rank_pattern),
        "alpha_pattern": dict(spec.alpha_pattern), "fan_in_fan_out": False, "use_dora": False,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in spec.modules}),
        **spec.extra_config,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


# Closed-form metrics, written independently of gradience.spectrum.
def expected_metrics(sigma: Sequence[float], r: int, shape: tuple[int, int]) -> dict[str, float]:
    s = sorted((float(x) for x in sigma), reverse=True)
    total = sum(x * x for x in s)
    k, acc = 0, 0.0
    for k, x in enumerate(s, 1):  # noqa: B007
        acc += x * x
        if acc >= 0.9 * total * (1 - 1e-12):
            break
    p = [x / sum(s) for x in s if x > 0]
    return {
        "frobenius_norm": math.sqrt(total),
        "sigma_max": s[0],
        "stable_rank": total / s[0] ** 2,
        "utilization": total / s[0] ** 2 / r,
        "energy_rank_90": k,
        "effective_rank": math.exp(-sum(q * math.log(q) for q in p)),
        "numerical_rank": sum(1 for x in s if x > s[0] * max(shape) * float(np.finfo(np.float32).eps)),
    }
