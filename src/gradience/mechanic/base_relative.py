"""How big each update is next to the weight it modifies: ‖ΔW‖₂/‖W‖₂ and ‖ΔW‖_F/‖W‖_F.

ΔW's norms come from the audit's singular values (the QR core). The base weight W's norms
come from the base model's safetensors shards, read one tensor at a time:

- ‖W‖_F is exact (a float64 sum over row blocks);
- ‖W‖₂ = σ_max(W) is estimated by power iteration on WᵀW, never by an SVD. Each step is
  v ← Wᵀ(W v) / ‖·‖ and the estimate is ‖W v‖, which only grows towards σ_max (it is a
  lower bound). It stops when the estimate changes by less than `POWER_TOL` (relative)
  between steps, or after `POWER_MAX_ITER` steps, when the module is reported as not
  converged. Near convergence the remaining error is about that change times
  ρ⁴ / (1 − ρ⁴), with ρ = σ₂/σ₁; for the usual gaps it is well under 1e-5.

bf16 / fp16 weights are upcast to float32 (float64 weights stay float64), so the working
memory is one tensor in float32. The matrix for a module is found by name: Llama / Mistral
paths (`model.layers.0.self_attn.q_proj` → `model.layers.0.self_attn.q_proj.weight`), GPT-2
paths whose checkpoint lacks the task wrapper (`transformer.h.0.attn.c_attn` →
`h.0.attn.c_attn.weight`, stored (in, out) as a Conv1D: fan_in_fan_out), and kohya's
flattened names. Norms are cached in a JSON file keyed by the shard files (names, sizes,
modification times) and the power-iteration settings, so a second audit reads them back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gradience._io import replace_atomic
from gradience.errors import AdapterError, UsageError
from gradience.lora.reader import SAVED_PREFIX
from gradience.lora.safetensors_file import TensorFile
from gradience.naming import is_flat

POWER_TOL = 1e-6  # relative change of the σ_max estimate between two steps
POWER_MAX_ITER = 1000
INDEX_NAME = "model.safetensors.index.json"
CACHE_SCHEMA = "gradience.base_norms/1"
_METHOD = f"power-iteration tol={POWER_TOL:g} max_iter={POWER_MAX_ITER}"
_ROW_BLOCK = 1024  # rows per float64 block for the Frobenius sum
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def power_sigma_max(
    w: np.ndarray, tol: float = POWER_TOL, max_iter: int = POWER_MAX_ITER, seed: int = 0
) -> tuple[float, int, bool]:
    """σ_max of a 2-D matrix by power iteration on WᵀW: (estimate, steps, converged).

    The start vector is seeded, so the result is deterministic. A zero matrix gives 0.

    Example:
        >>> round(power_sigma_max(np.diag([3.0, 1.0]))[0], 6)
        3.0
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {list(w.shape)}")
    v = np.asarray(np.random.default_rng(seed).standard_normal(w.shape[1]), dtype=w.dtype)
    v /= np.linalg.norm(v)
    estimate = 0.0
    for step in range(1, max_iter + 1):
        u = w @ v
        new = float(np.linalg.norm(u.astype(np.float64)))
        if new == 0.0:
            return 0.0, step, True
        z = w.T @ u
        norm_z = float(np.linalg.norm(z.astype(np.float64)))
        if norm_z == 0.0:  # u is orthogonal to W's range only when W v = 0, checked above
            return new, step, True
        v = np.asarray(z / norm_z, dtype=w.dtype)
        if abs(new - estimate) <= tol * new:
            return new, step, True
        estimate = new
    return estimate, max_iter, False


def frobenius_norm(w: np.ndarray) -> float:
    """sqrt(Σ w²) accumulated in float64, a block of rows at a time."""
    total = 0.0
    for i in range(0, w.shape[0], _ROW_BLOCK):
        block = np.asarray(w[i : i + _ROW_BLOCK], dtype=np.float64)
        total += float(np.einsum("ij,ij->", block, block))
    return math.sqrt(total)


def base_weight_key(module: str, keys: Collection[str]) -> str | None:
    """The base checkpoint key of the weight that `module`'s update is added to, or None.

    Tries `<module>.weight`, then the path without the task wrapper's leading components
    (those before the first block index: `transformer.h.0.attn.c_attn` → `h.0.attn.c_attn`),
    then a unique key that adds a prefix (`layers.0.q_proj` → `model.layers.0.q_proj`).
    Kohya's flattened names match a key whose dots, written as underscores, end the name.

    Example:
        >>> base_weight_key("transformer.h.0.attn.c_attn", {"h.0.attn.c_attn.weight"})
        'h.0.attn.c_attn.weight'
    """
    name = module.removeprefix(SAVED_PREFIX)
    if is_flat(name):
        return _flat_key(name, keys)
    parts = name.split(".")
    first_index = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
    for i in range(first_index + 1):
        candidate = ".".join(parts[i:]) + ".weight"
        if candidate in keys:
            return candidate
    hits = [k for k in keys if k.endswith(f".{name}.weight")]
    return hits[0] if len(hits) == 1 else None


def _flat_key(name: str, keys: Collection[str]) -> str | None:
    best: list[str] = []
    best_len = 0
    for key in keys:
        if not key.endswith(".weight"):
            continue
        flat = key.removesuffix(".weight").replace(".", "_")
        if name.endswith("_" + flat) and len(flat) >= best_len:
            best, best_len = ([*best, key] if len(flat) == best_len else [key]), len(flat)
    return best[0] if len(best) == 1 else None


@dataclass(frozen=True)
class WeightNorms:
    """Norms of one base weight, as cached."""

    key: str
    shape: tuple[int, ...]
    sigma_max: float
    frobenius_norm: float
    iterations: int
    converged: bool


class BaseWeights:
    """A base model's safetensors weights (one file, or a folder of shards), read lazily.

    Example:
        >>> base = BaseWeights("models/llama")                          # doctest: +SKIP
        >>> base.norms("model.layers.0.self_attn.q_proj.weight").sigma_max  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._shards = _shard_files(self.path)
        self._files: dict[Path, TensorFile] = {}
        self._where = self._weight_map()

    @property
    def keys(self) -> Collection[str]:
        return self._where.keys()

    def fingerprint(self) -> str:
        """sha256 of the shards' names, sizes and mtimes and the power-iteration settings."""
        stats = []
        for shard in self._shards:
            st = shard.stat()
            stats.append([shard.name, st.st_size, st.st_mtime_ns])
        blob = json.dumps({"method": _METHOD, "shards": stats}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(key).info(key).shape

    def norms(self, key: str) -> WeightNorms:
        """Read one weight (upcast to float32, float64 kept) and compute its two norms."""
        tf = self._file(key)
        info = tf.info(key)
        where = f"{tf.path}: tensor {key!r}"
        if info.dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"{where} has dtype {info.dtype} (quantized?); norms need float weights")
        w = tf.read(key).astype(np.float64 if info.dtype == "F64" else np.float32, copy=False)
        w = w.reshape(w.shape[0], -1) if w.ndim > 2 else w
        if w.ndim != 2:
            raise AdapterError(f"{where} has shape {list(info.shape)}; expected a matrix")
        if not np.isfinite(w).all():
            raise AdapterError(f"{where} holds NaN/Inf values")
        sigma, steps, converged = power_sigma_max(w)
        return WeightNorms(key, info.shape, sigma, frobenius_norm(w), steps, converged)

    def _file(self, key: str) -> TensorFile:
        shard = self._where[key]
        if shard not in self._files:
            self._files[shard] = TensorFile(shard)
        return self._files[shard]

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / INDEX_NAME if self.path.is_dir() else None
        if index is not None and index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                return {str(k): self.path / str(v) for k, v in dict(weight_map).items()}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise AdapterError(f"{index}: not a safetensors index ({exc})") from None
        out: dict[str, Path] = {}
        for shard in self._shards:
            tf = TensorFile(shard)
            self._files[shard] = tf
            out.update(dict.fromkeys(tf.names, shard))
        return out


def _shard_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UsageError(f"{path}: base model not found (pass a folder of safetensors shards)")
    shards = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if not shards:
        raise UsageError(
            f"{path}: no *.safetensors shards; base weights are read from safetensors only "
            "(convert pytorch_model.bin with `save_pretrained(..., safe_serialization=True)`)"
        )
    return shards


# --- cache ----------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$GRADIENCE_CACHE_DIR`, else `$XDG_CACHE_HOME/gradience`, else `~/.cache/gradience`."""
    env = os.environ.get("GRADIENCE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gradience"


def default_cache_path(fingerprint: str) -> Path:
    return default_cache_dir() / "base_norms" / f"{fingerprint[:32]}.json"


def _load_cache(path: Path, fingerprint: str) -> dict[str, WeightNorms]:
    """Cached norms for this fingerprint; anything unreadable or stale counts as empty."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema") != CACHE_SCHEMA or data.get("fingerprint") != fingerprint:
            return {}
        return {k: WeightNorms(k, tuple(v["shape"]), float(v["sigma_max"]), float(v["frobenius_norm"]),
                               int(v["iterations"]), bool(v["converged"]))
                for k, v in data["weights"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _save_cache(path: Path, fingerprint: str, base: Path, norms: Mapping[str, WeightNorms]) -> None:
    weights = {k: {f: v for f, v in asdict(n).items() if f != "key"} for k, n in sorted(norms.items())}
    data = {"schema": CACHE_SCHEMA, "fingerprint": fingerprint, "base_model": str(base),
            "method": _METHOD, "weights": weights}
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomic(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))


# --- per-module ratios ----------------------------------------------------------------------


class _Row(Protocol):
    """What is needed of an audit row (`gradience.mechanic.audit.ModuleAudit`)."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def status(self) -> str: ...
    @property
    def sigma_max(self) -> float | None: ...
    @property
    def frobenius_norm(self) -> float | None: ...


@dataclass(frozen=True)
class ModuleRelative:
    name: str
    base_key: str
    rel_spectral: float  # ‖ΔW‖₂ / ‖W‖₂
    rel_frobenius: float  # ‖ΔW‖_F / ‖W‖_F


@dataclass(frozen=True)
class BaseRelativeSummary:
    """Aggregates of the base-relative sizes; `unmatched` says why a module has none."""

    base_model: str
    cache_path: str | None
    n_matched: int
    n_unmatched: int
    rel_spectral_median: float
    rel_spectral_max: float
    rel_frobenius_median: float
    rel_frobenius_max: float
    largest: tuple[dict[str, Any], ...]  # top modules by rel_spectral: name, rel_spectral, rel_frobenius
    unmatched: tuple[dict[str, str], ...]
    power_tol: float = POWER_TOL
    power_max_iter: int = POWER_MAX_ITER
    unconverged: tuple[str, ...] = ()


@dataclass(frozen=True)
class BaseRelative:
    modules: Mapping[str, ModuleRelative]
    summary: BaseRelativeSummary
    warnings: tuple[str, ...]


def relative_sizes(
    rows: Iterable[_Row], base_model: str | Path, cache: str | Path | None = None,
    use_cache: bool = True, top: int = 5,
) -> BaseRelative:
    """Base-relative update sizes of audited modules.

    Args:
        rows: audit rows; `nonfinite` ones are skipped.
        base_model: a folder of safetensors shards (with or without
            `model.safetensors.index.json`) or one safetensors file.
        cache: the cache file; default `default_cache_path(fingerprint)`.
        use_cache: False reads and writes no cache.
        top: how many modules `summary.largest` lists.

    Returns:
        BaseRelative: per-module ratios, a summary, and warnings (cache not writable,
        power iteration not converged).

    Raises:
        UsageError: no base model there. AdapterError: an unreadable shard or index.
    """
    base = BaseWeights(base_model)
    fingerprint = base.fingerprint()
    cache_path = Path(cache) if cache else default_cache_path(fingerprint)
    cached = _load_cache(cache_path, fingerprint) if use_cache else {}
    known = dict(cached)
    out: dict[str, ModuleRelative] = {}
    unmatched: list[dict[str, str]] = []
    for row in rows:
        if row.status == "nonfinite":
            continue
        try:
            key = _match(base, row)
            if key not in known:
                known[key] = base.norms(key)
        except AdapterError as exc:
            unmatched.append({"module": row.name, "reason": str(exc)})
            continue
        norms = known[key]
        if norms.sigma_max <= 0.0 or norms.frobenius_norm <= 0.0:
            unmatched.append({"module": row.name, "reason": f"base weight {key} is all zero"})
            continue
        out[row.name] = ModuleRelative(
            row.name, key, (row.sigma_max or 0.0) / norms.sigma_max, (row.frobenius_norm or 0.0) / norms.frobenius_norm
        )
    warnings = []
    if use_cache and known != cached:
        try:
            _save_cache(cache_path, fingerprint, base.path, known)
        except OSError as exc:
            warnings.append(f"could not write the base-norm cache {cache_path} ({exc.strerror or exc}); "
                            "pass --base-cache FILE to put it elsewhere")
    unconverged = tuple(sorted({known[m.base_key].key for m in out.values() if not known[m.base_key].converged}))
    if unconverged:
        warnings.append(f"power iteration did not converge in {POWER_MAX_ITER} steps for {len(unconverged)} "
                        f"base weight(s) (σ₁ ≈ σ₂; the ratio is an upper bound): {', '.join(unconverged[:3])}")
    summary = _summarise(base.path, cache_path if use_cache else None, out, unmatched, unconverged, top)
    return BaseRelative(modules=out, summary=summary, warnings=tuple(warnings))


def _match(base: BaseWeights, row: _Row) -> str:
    key = base_weight_key(row.name, base.keys)
    if key is None:
        raise AdapterError("no base weight with this name")
    shape = base.shape(key)
    flat = (shape[0], int(np.prod(shape[1:], dtype=np.int64))) if len(shape) >= 2 else tuple(shape)
    out_f, in_f = row.shape
    if flat not in ((out_f, in_f), (in_f, out_f)):  # (in, out) is a Conv1D (fan_in_fan_out)
        raise AdapterError(f"base weight {key} has shape {list(shape)}, the update is {out_f}x{in_f}")
    return key


def _summarise(
    base: Path, cache: Path | None, out: Mapping[str, ModuleRelative],
    unmatched: Sequence[dict[str, str]], unconverged: tuple[str, ...], top: int,
) -> BaseRelativeSummary:
    spec = [m.rel_spectral for m in out.values()]
    frob = [m.rel_frobenius for m in out.values()]
    ranked = sorted(out.values(), key=lambda m: (-m.rel_spectral, m.name))
    return BaseRelativeSummary(
        base_model=str(base), cache_path=str(cache) if cache else None,
        n_matched=len(out), n_unmatched=len(unmatched),
        rel_spectral_median=float(np.median(spec)) if spec else 0.0, rel_spectral_max=max(spec, default=0.0),
        rel_frobenius_median=float(np.median(frob)) if frob else 0.0, rel_frobenius_max=max(frob, default=0.0),
        largest=tuple({"name": m.name, "rel_spectral": m.rel_spectral, "rel_frobenius": m.rel_frobenius}
                      for m in ranked[:top]),
        unmatched=tuple(unmatched), unconverged=unconverged,
    )
