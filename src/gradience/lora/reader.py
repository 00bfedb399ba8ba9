"""Reading a saved LoRA adapter as the library that trained it would apply it.

The one home of LoRA config semantics, over the two key grammars of `gradience.lora.keys`. `peft` (a
folder): settings from `adapter_config.json`, per-module r / alpha from `rank_pattern` /
`alpha_pattern` (PEFT's matching rule), rsLoRA, `fan_in_fan_out`, embedding LoRA, DoRA,
adapter-name infixes. `kohya` (one safetensors file from kohya-ss or diffusers):
`<prefix>.lora_down.weight` (r, in[, kh, kw]), `<prefix>.lora_up.weight` (out, r[, 1, 1]),
an optional scalar `<prefix>.alpha` (diffusers' `.lora.down`, `_lora.down`,
`.lora_linear_layer.down` and config-less `lora_A` spellings too); settings from the file
itself: scale = alpha / r, alpha = r if absent.
Weights are read lazily, one module at a time, so memory does not grow with the adapter.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradience.errors import AdapterError, UnsupportedAdapterError, UsageError
from gradience.lora.keys import FOREIGN_PARTS, PART_LABELS
from gradience.lora.keys import FORMATS as FORMATS
from gradience.lora.keys import SAVED_PREFIX as SAVED_PREFIX
from gradience.lora.keys import detect_format as detect_format
from gradience.lora.keys import parse_lora_key as parse_lora_key
from gradience.lora.keys import pattern_key as pattern_key
from gradience.lora.safetensors_file import TensorFile
from gradience.naming import layer_index as layer_index
from gradience.naming import module_type as module_type
from gradience.naming import natural_key

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
@dataclass(frozen=True)
class LoraSettings:
    """The parts of `adapter_config.json` that decide what each module's update is."""

    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    target_modules: Any = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    peft_type: str = "LORA"
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], source: str = CONFIG_NAME) -> LoraSettings:
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise UnsupportedAdapterError(
                f"{source}: peft_type is {peft_type}; gradience audits LoRA adapters only (LoRA, rsLoRA, DoRA)"
            )
        try:
            settings = cls(
                r=int(cfg.get("r", 8)), lora_alpha=float(cfg.get("lora_alpha", 8)),
                use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
                fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
                rank_pattern={str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()},
                alpha_pattern={str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
                target_modules=cfg.get("target_modules"), base_model_name_or_path=cfg.get("base_model_name_or_path"),
                task_type=cfg.get("task_type"), peft_type=peft_type, raw=dict(cfg),
            )
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:  # e.g. r: Infinity
            raise AdapterError(f"{source}: invalid LoRA setting ({exc})") from None
        if settings.r <= 0:
            raise AdapterError(f"{source}: `r` must be a positive integer, got {settings.r}")
        alphas = [("lora_alpha", settings.lora_alpha)]
        alphas += [(f"alpha_pattern[{k!r}]", v) for k, v in settings.alpha_pattern.items()]
        for label, alpha in alphas:  # NaN / Infinity parse as JSON here; PEFT would scale by them
            if not math.isfinite(alpha):
                raise AdapterError(f"{source}: `{label}` must be a finite number, got {alpha}")
        return settings

    def rank_for(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scale_for(self, module: str) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass(frozen=True)
class LoraModule:
    """One module's factors as stored, with the settings PEFT would apply to them.

    `lora_A` is (r, in) and `lora_B` (out, r) whatever the layer type: embedding factors
    are transposed into that orientation (ΔW's singular values do not depend on it) and
    convolution kernels are flattened.
    """

    name: str
    kind: str  # "linear", "embedding" or "conv"
    lora_A: np.ndarray
    lora_B: np.ndarray
    r: int
    alpha: float
    scale: float
    dora: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.lora_B.shape[0]), int(self.lora_A.shape[1])

    @property
    def params(self) -> int:
        return int(self.lora_A.size + self.lora_B.size)


@dataclass(frozen=True)
class ModuleProblem:
    """A module that cannot be audited; the rest of the adapter still is."""

    name: str
    message: str


@dataclass(frozen=True)
class _ModuleKeys:
    a: str | None = None
    b: str | None = None
    embedding: bool = False
    magnitude: str | None = None
    alpha: str | None = None  # kohya: the module's scalar alpha tensor


def _find_config(peft_dir: Path) -> Path:
    path = peft_dir / CONFIG_NAME
    if path.is_file():
        return path
    nested = sorted(p.parent.name for p in peft_dir.glob(f"*/{CONFIG_NAME}"))
    hint = f"; adapters found in subfolders: {', '.join(nested)} (pass --peft-dir {peft_dir}/{nested[0]})" if nested else ""
    raise UsageError(f"{peft_dir}: no {CONFIG_NAME}{hint}")


def _find_weights(peft_dir: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (peft_dir / name).is_file():
            return peft_dir / name
    raise UsageError(f"{peft_dir}: no adapter_model.safetensors or adapter_model.bin")


def load_settings(path: Path) -> LoraSettings:
    """Parse an `adapter_config.json` into `LoraSettings` with one-line errors."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: adapter config not found") from None
    except RecursionError:
        raise AdapterError(f"{path}: invalid JSON (nested too deep)") from None
    except ValueError as exc:  # bad UTF-8, bad JSON, an integer of thousands of digits
        raise AdapterError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return LoraSettings.from_dict(cfg, source=str(path))


class Adapter:
    """A LoRA adapter on disk, indexed from the weights header only.

    `fmt` is the key grammar (`peft` or `kohya`, see the module docstring). A kohya file has
    no config: `settings` then summarises the file (most common rank and alpha) and each
    module's r and alpha are read from its own tensors.

    Example:
        >>> adapter = Adapter.open("runs/toy/peft")  # doctest: +SKIP
        >>> for module in adapter.modules(): ...      # doctest: +SKIP
    """

    def __init__(self, config_path: Path | None, weights_path: Path, settings: LoraSettings | None, fmt: str = "peft") -> None:
        self.config_path = config_path
        self.weights_path = weights_path
        self.format = fmt
        self.file = TensorFile(weights_path)
        self._index = self._build_index()
        self.settings = settings if settings is not None else self._file_settings()

    @classmethod
    def open(
        cls, peft_dir: str | Path | None, adapter_config: str | Path | None = None,
        weights: str | Path | None = None, fmt: str = "auto",
    ) -> Adapter:
        """Open a PEFT directory, or a single weights file when `peft_dir` is None.

        `adapter_config` / `weights` override the files in `peft_dir`. `fmt="auto"` reads a
        folder as PEFT; a lone file as PEFT when an adapter_config.json sits beside it,
        else as kohya (its keys say which spelling).
        """
        if fmt not in ("auto", *FORMATS):
            raise UsageError(f"unknown --format {fmt!r}; choose from auto, {', '.join(FORMATS)}")
        if peft_dir is None:
            return cls._open_file(weights, adapter_config, fmt)
        if fmt == "kohya":
            raise UsageError("--format kohya reads one file: pass --weights FILE without --peft-dir")
        d = Path(peft_dir)
        if not d.exists():
            raise UsageError(f"{d}: directory not found")
        if not d.is_dir():
            raise UsageError(
                f"{d}: not a directory (pass the folder that holds {CONFIG_NAME}, "
                "or a single-file kohya/diffusers LoRA as --weights FILE without --peft-dir)"
            )
        config_path = Path(adapter_config) if adapter_config else _find_config(d)
        weights_path = Path(weights) if weights else _find_weights(d)
        return cls(config_path, weights_path, load_settings(config_path))

    @classmethod
    def _open_file(cls, weights: str | Path | None, adapter_config: str | Path | None, fmt: str) -> Adapter:
        if weights is None:
            raise UsageError("pass --peft-dir DIR, or --weights FILE for a single-file (kohya) adapter")
        path = Path(weights)
        beside = path.parent / CONFIG_NAME
        config = Path(adapter_config) if adapter_config else (beside if beside.is_file() else None)
        if fmt == "auto":
            fmt = "kohya" if config is None or detect_format(TensorFile(path).names) == "kohya" else "peft"
        if fmt == "peft":
            if config is None:
                raise UsageError(f"{path}: no {CONFIG_NAME} beside it; pass --adapter-config or --format kohya")
            return cls(config, path, load_settings(config))
        return cls(None, path, None, "kohya")

    @property
    def module_names(self) -> list[str]:
        return list(self._index)

    @property
    def is_dora(self) -> bool:
        """True when the config says DoRA or the weights carry magnitude vectors."""
        return self.settings.use_dora or any(k.magnitude for k in self._index.values())

    @property
    def other_tensors(self) -> list[str]:
        """Tensors that are not LoRA factors (modules_to_save heads, embedding copies)."""
        return self._others

    def unmatched_pattern_keys(self) -> dict[str, list[str]]:
        """rank_pattern / alpha_pattern keys that match no module: probably typos."""
        out: dict[str, list[str]] = {}
        for label, pattern in (("rank_pattern", self.settings.rank_pattern), ("alpha_pattern", self.settings.alpha_pattern)):
            # PEFT's own check: a key shadowed by an earlier one still matches a module.
            missing = [k for k in pattern if not any(pattern_key([k], n) for n in self._index)]
            if missing:
                out[label] = missing
        return out

    def modules(self) -> Iterator[LoraModule | ModuleProblem]:
        """Yield each module's factors (read now) or the reason it cannot be audited."""
        for name, keys in self._index.items():
            try:
                yield self._load(name, keys)
            except AdapterError as exc:
                yield ModuleProblem(name, str(exc))

    def _build_index(self) -> dict[str, _ModuleKeys]:
        index: dict[str, dict[str, Any]] = {}
        self._others: list[str] = []
        adapters: set[str] = set()
        for info in self.file:
            for method in (m for frag, m in FOREIGN_PARTS.items() if f".{frag}" in info.name):
                raise UnsupportedAdapterError(
                    f"{self.weights_path}: holds {method} tensors ({info.name}); gradience audits LoRA adapters only"
                )
            parsed = parse_lora_key(info.name, self.format)
            if parsed is None:
                self._others.append(info.name)
                continue
            module, part, adapter_name = parsed
            if adapter_name is not None:
                adapters.add(adapter_name)
            slot = index.setdefault(module, {})
            if part in ("lora_A", "lora_embedding_A"):
                slot["a"], slot["embedding"] = info.name, part == "lora_embedding_A"
            elif part in ("lora_B", "lora_embedding_B"):
                slot["b"] = info.name
            elif part == "alpha":
                slot["alpha"] = info.name
            else:
                slot["magnitude"] = info.name
        if len(adapters) > 1:
            raise UsageError(
                f"{self.weights_path}: holds several adapters ({', '.join(sorted(adapters))}); "
                "save each with save_pretrained and audit them one at a time"
            )
        if not index:
            raise AdapterError(f"{self.weights_path}: no LoRA tensors ({' / '.join(PART_LABELS[self.format])}) found")
        return {k: _ModuleKeys(**v) for k, v in sorted(index.items(), key=lambda kv: natural_key(kv[0]))}

    def _load(self, name: str, keys: _ModuleKeys) -> LoraModule:
        where = f"{self.weights_path}: module {name}"
        label_a, label_b = PART_LABELS[self.format]
        if keys.a is None or keys.b is None:
            have, lacks = (label_a, label_b) if keys.a else (label_b, label_a)
            have = have if keys.a or keys.b else "only alpha"
            raise AdapterError(f"{where} has {have} but no {lacks}")
        a, b = self.file.read(keys.a), self.file.read(keys.b)
        kind = "linear"
        if keys.embedding:
            # PEFT stores embedding factors as A: (r, num_embeddings), B: (dim, r) and applies
            # (B @ A).T; transposing both keeps the (r, in) / (out, r) convention.
            a, b, kind = b.T, a.T, "embedding"
        elif a.ndim > 2 or b.ndim > 2:
            # Explicit widths, not -1: numpy cannot infer a width for a zero-size tensor.
            a, b = a.reshape(a.shape[0], math.prod(a.shape[1:])), b.reshape(b.shape[0], math.prod(b.shape[1:]))
            kind = "conv"
        if a.ndim != 2 or b.ndim != 2:
            raise AdapterError(f"{where}: expected 2-D factors, got {list(a.shape)} and {list(b.shape)}")
        if a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{where}: {label_a} has rank {a.shape[0]} but {label_b} has rank {b.shape[1]} (shape mismatch)"
            )
        if self.format == "kohya":
            r, alpha = int(a.shape[0]), self._kohya_alpha(keys, int(a.shape[0]), where)
            return LoraModule(name=name, kind=kind, lora_A=a, lora_B=b, r=r, alpha=alpha, scale=alpha / r)
        r = self.settings.rank_for(name)
        if a.shape[0] != r:
            raise AdapterError(
                f"{where}: weights have rank {a.shape[0]} but the config gives r={r} "
                "(check r / rank_pattern in adapter_config.json)"
            )
        return LoraModule(
            name=name, kind=kind, lora_A=a, lora_B=b, r=r,
            alpha=self.settings.alpha_for(name), scale=self.settings.scale_for(name),
            dora=keys.magnitude is not None or self.settings.use_dora,
        )

    def _kohya_alpha(self, keys: _ModuleKeys, r: int, where: str) -> float:
        """The module's `.alpha` scalar (kohya's scale is alpha / r), or r when it has none."""
        if keys.alpha is None:
            return float(r)
        value = np.asarray(self.file.read(keys.alpha), dtype=np.float64)
        if value.size != 1 or not np.isfinite(value).all():
            raise AdapterError(f"{where}: alpha must be one finite number, got shape {list(value.shape)}")
        return float(value.reshape(()))

    def _file_settings(self) -> LoraSettings:
        """A kohya file's summary for the report: its most common rank and its median alpha."""
        ranks = Counter(self.file.info(k.a).shape[0] for k in self._index.values() if k.a is not None)
        r = max(1, max(ranks, key=lambda k: (ranks[k], k)) if ranks else 1)
        alphas = [self.file.read(k.alpha) for k in self._index.values() if k.alpha is not None]
        alpha = float(np.median([float(np.asarray(x, np.float64).ravel()[0]) for x in alphas if x.size])) if alphas else r
        return LoraSettings(r=r, lora_alpha=alpha, raw={"format": "kohya"})
