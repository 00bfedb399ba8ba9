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

from gradience._quantile import median
from gradience.errors import AdapterError, UnsupportedAdapterError, UsageError
from gradience.lora.keys import (
    FOREIGN_PARTS,
    PART_LABELS,
    invalid_pattern_key,
    is_base_copy,
    matching_pattern_keys,
    stored_module_prefix,
)
from gradience.lora.keys import FORMATS as FORMATS
from gradience.lora.keys import SAVED_PREFIX as SAVED_PREFIX
from gradience.lora.keys import detect_format as detect_format
from gradience.lora.keys import parse_lora_key as parse_lora_key
from gradience.lora.keys import pattern_key as pattern_key
from gradience.lora.safetensors_file import TensorFile
from gradience.lora.scale import lora_scale
from gradience.naming import layer_index as layer_index
from gradience.naming import module_type as module_type
from gradience.naming import natural_key

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# `init_lora_weights` values after which B·A is the update to the untouched base weights;
# PiSSA, OLoRA, CorDA, LoftQ (and any other) change the base at init, so B·A alone is not.
PLAIN_INITS = (True, False, "gaussian", "eva")


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
    # A linter (`gradience check`) holds what the file says so it can report each fault as a
    # finding: pattern keys PEFT would refuse (rank 0, an invalid regex) are then kept.
    lint: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """The same one-line errors a file gets, for settings built in code."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise AdapterError(f"`r` must be a positive integer, got {self.r!r}")
        alphas = [("lora_alpha", self.lora_alpha)]
        alphas += [(f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()]
        for label, alpha in alphas:  # NaN / Infinity parse as JSON; PEFT would scale by them
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise AdapterError(f"`{label}` must be a finite number, got {alpha!r}")
        if self.lint:
            return
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise AdapterError(f"`rank_pattern[{key!r}]` must be a positive integer, got {rank!r}")
        for label, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in pattern:
                why = invalid_pattern_key(key)
                if why is not None:
                    raise AdapterError(
                        f"`{label}` key {key!r} is not a valid regular expression ({why}); "
                        "PEFT will refuse to load this adapter"
                    )

    @property
    def init_lora_weights(self) -> Any:
        return self.raw.get("init_lora_weights", True)

    def init_warning(self) -> str | None:
        """Why B·A may not be this adapter's update (PiSSA-style init not converted at save), or None."""
        init = self.init_lora_weights
        if any(init is p or (isinstance(init, str) and init.lower() == p) for p in PLAIN_INITS):
            return None
        return (
            f"init_lora_weights={init!r}: the base weights were changed at init, so B·A is not the update "
            "(only an adapter converted at save, path_initial_model_for_weight_conversion, is); "
            "its numbers describe the factors, not the change to the model"
        )

    def pattern_overlaps(self, modules: Iterator[str] | list[str]) -> list[str]:
        """One line per module that two pattern keys match: which key PEFT applies (the first in file order)."""
        out = []
        for name in modules:
            for label, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
                hits = matching_pattern_keys(pattern, name)
                if len(hits) > 1:
                    out.append(
                        f"{label} keys {', '.join(map(repr, hits))} all match module {name}; PEFT applies the first "
                        f"in file order ({hits[0]!r}), and save_pretrained sorts the keys, so the value can "
                        "change between training and reload: make each key match one module"
                    )
        return out

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], source: str = CONFIG_NAME, lint: bool = False) -> LoraSettings:
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise UnsupportedAdapterError(
                f"{source}: peft_type is {peft_type}; gradience audits LoRA adapters only (LoRA, rsLoRA, DoRA)"
            )
        try:
            return cls(
                r=int(cfg.get("r", 8)), lora_alpha=float(cfg.get("lora_alpha", 8)),
                use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
                fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
                rank_pattern={str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()},
                alpha_pattern={str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
                target_modules=cfg.get("target_modules"), base_model_name_or_path=cfg.get("base_model_name_or_path"),
                task_type=cfg.get("task_type"), peft_type=peft_type, raw=dict(cfg), lint=lint,
            )
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:  # e.g. r: Infinity
            raise AdapterError(f"{source}: invalid LoRA setting ({exc})") from None
        except AdapterError as exc:
            raise AdapterError(f"{source}: {exc}") from None

    def rank_for(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scale_for(self, module: str) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scale(self.alpha_for(module), self.rank_for(module), self.use_rslora)


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
    lora_bias: np.ndarray | None = None  # lora_B's bias (`lora_bias=True`): PEFT adds scale · b
    stored_params: int | None = None  # when the stored factors differ from A, B (kohya Tucker: down, mid, up)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.lora_B.shape[0]), int(self.lora_A.shape[1])

    @property
    def params(self) -> int:
        if self.stored_params is not None:
            return self.stored_params
        return int(self.lora_A.size + self.lora_B.size + (0 if self.lora_bias is None else self.lora_bias.size))


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
    magnitude: str | None = None  # PEFT lora_magnitude_vector or kohya dora_scale
    alpha: str | None = None  # kohya: the module's scalar alpha tensor
    bias: str | None = None  # lora_B.bias
    mid: str | None = None  # kohya LoCon Tucker core (r, r, kh, kw)
    unknown: tuple[str, ...] = ()  # tensors under the module's prefix that are no LoRA part


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


def load_settings(path: Path, lint: bool = False) -> LoraSettings:
    """Parse an `adapter_config.json` into `LoraSettings` with one-line errors (`lint`: see `LoraSettings.lint`)."""
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
    return LoraSettings.from_dict(cfg, source=str(path), lint=lint)


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

    def pattern_overlaps(self) -> list[str]:
        """Modules that two rank_pattern / alpha_pattern keys match (see `LoraSettings.pattern_overlaps`)."""
        return self.settings.pattern_overlaps(list(self._index)) if self.format == "peft" else []

    def init_warning(self) -> str | None:
        """Why B·A may not be this adapter's update (PiSSA-style init), or None."""
        return self.settings.init_warning() if self.format == "peft" else None

    def modules(self) -> Iterator[LoraModule | ModuleProblem]:
        """Yield each module's factors (read now) or the reason it cannot be audited."""
        for name, keys in self._index.items():
            try:
                yield self._load(name, keys)
            except AdapterError as exc:
                yield ModuleProblem(name, str(exc))

    def _build_index(self) -> dict[str, _ModuleKeys]:
        """Every tensor is a LoRA part of a module, a base copy or other tensor, or refuses its module."""
        index: dict[str, dict[str, Any]] = {}
        prefixes: dict[str, str] = {}  # stored module prefix -> module
        others: list[str] = []
        adapters: set[str] = set()
        for info in self.file:
            for method in (m for frag, m in FOREIGN_PARTS.items() if f".{frag}" in info.name):
                raise UnsupportedAdapterError(
                    f"{self.weights_path}: holds {method} tensors ({info.name}); "
                    f"{method} is not LoRA (no B·A update); gradience audits LoRA adapters only"
                )
            parsed = parse_lora_key(info.name, self.format)
            if parsed is None:
                others.append(info.name)
                continue
            module, part, adapter_name = parsed
            prefixes[str(stored_module_prefix(info.name, self.format))] = module
            if adapter_name is not None:
                adapters.add(adapter_name)
            slot = index.setdefault(module, {})
            if part in ("lora_A", "lora_embedding_A"):
                slot["a"], slot["embedding"] = info.name, part == "lora_embedding_A"
            elif part in ("lora_B", "lora_embedding_B"):
                slot["b"] = info.name
            else:
                slot[_SLOTS[part]] = info.name
        self._others: list[str] = []
        for name in others:
            owner = _owner(name, prefixes)
            if owner is None or is_base_copy(name[len(owner) + 1:]):
                self._others.append(name)
            else:
                slot = index[prefixes[owner]]
                slot["unknown"] = (*slot.get("unknown", ()), name)
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
        if keys.unknown:
            raise AdapterError(
                f"{where}: unrecognised tensor {keys.unknown[0]} under the module "
                "(not a LoRA part nor a base-weight copy); refusing the module rather than guessing"
            )
        if keys.a is None or keys.b is None:
            have, lacks = (label_a, label_b) if keys.a else (label_b, label_a)
            have = have if keys.a or keys.b else "only alpha"
            raise AdapterError(f"{where} has {have} but no {lacks}")
        a, b = self.file.read(keys.a), self.file.read(keys.b)
        kind = "linear"
        if keys.mid is not None:
            return self._load_tucker(name, keys, a, b, where)
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
            return LoraModule(
                name=name, kind=kind, lora_A=a, lora_B=b, r=r, alpha=alpha, scale=lora_scale(alpha, r),
                dora=keys.magnitude is not None,
            )
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
            lora_bias=self._bias(keys, int(b.shape[0]), where),
        )

    def _bias(self, keys: _ModuleKeys, out: int, where: str) -> np.ndarray | None:
        if keys.bias is None:
            return None
        bias = self.file.read(keys.bias)
        if bias.shape != (out,):
            raise AdapterError(f"{where}: lora_B.bias has shape {list(bias.shape)}, expected [{out}]")
        return bias

    def _load_tucker(self, name: str, keys: _ModuleKeys, down: np.ndarray, up: np.ndarray, where: str) -> LoraModule:
        """kohya/LyCORIS LoCon with a Tucker core, as LyCORIS applies it.

        ΔW[o, c, h, w] = scale · Σ_ij up[o, i] · mid[i, j, h, w] · down[j, c] (LyCORIS'
        `rebuild_tucker`), scale = alpha / r with r = down's rank. Folding the core into the
        down factor, A'[i, (c, h, w)] = Σ_j mid[i, j, h, w] · down[j, c], keeps it an exact
        rank-r product B · A' over the flattened kernel.
        """
        mid = np.asarray(self.file.read(str(keys.mid)), dtype=np.float64)
        d = np.asarray(down, dtype=np.float64).reshape(down.shape[0], -1)
        u = np.asarray(up, dtype=np.float64).reshape(up.shape[0], -1)
        if mid.ndim != 4 or mid.shape[0] != u.shape[1] or mid.shape[1] != d.shape[0]:
            raise AdapterError(
                f"{where}: lora_mid has shape {list(mid.shape)}, expected [{u.shape[1]}, {d.shape[0]}, kh, kw] "
                f"for lora_up {list(up.shape)} and lora_down {list(down.shape)}"
            )
        a = np.einsum("ijhw,jc->ichw", mid, d).reshape(mid.shape[0], -1)
        r = int(d.shape[0])
        alpha = self._kohya_alpha(keys, r, where)
        return LoraModule(
            name=name, kind="conv", lora_A=a, lora_B=u, r=r, alpha=alpha, scale=lora_scale(alpha, r),
            dora=keys.magnitude is not None, stored_params=int(down.size + mid.size + up.size),
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
        alpha = median([float(np.asarray(x, np.float64).ravel()[0]) for x in alphas if x.size]) if alphas else r
        return LoraSettings(r=r, lora_alpha=alpha, raw={"format": "kohya"})


_SLOTS = {"alpha": "alpha", "lora_B.bias": "bias", "lora_mid": "mid", "dora_scale": "magnitude",
          "lora_magnitude_vector": "magnitude"}  # fmt: skip


def _owner(name: str, prefixes: Mapping[str, str]) -> str | None:
    """The longest stored module prefix that `name` lies under (`prefix.` + rest), or None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in prefixes:
            return head
    return None
