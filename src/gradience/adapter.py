"""Reading a saved PEFT LoRA adapter as PEFT itself would apply it.

This module is the one home of LoRA key parsing and of config semantics: per-module rank
and alpha from `rank_pattern` / `alpha_pattern` (PEFT's matching rule), the rsLoRA scale,
`fan_in_fan_out`, embedding LoRA, DoRA and adapter-name infixes. Weights are read lazily,
one module at a time, so an audit's memory does not grow with the adapter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradience.errors import AdapterError, UnsupportedAdapterError, UsageError
from gradience.tensorfile import TensorFile

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
SAVED_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module paths
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
# Key fragments of PEFT methods that are not LoRA: their tensors are not B·A products.
_FOREIGN_PARTS = {
    "hada_w1_a": "LoHa", "lokr_w1": "LoKr", "vera_lambda_b": "VeRA", "ia3_l": "IA3",
    "lora_E": "AdaLoRA", "oft_r": "OFT", "boft_R": "BOFT",
}
_KEY_RE = re.compile(r"^(?P<module>.+?)\.(?P<part>" + "|".join(LORA_PARTS) + r")(?P<rest>(\.[^.]+)*)$")


def pattern_key(pattern_keys: Iterable[str], module_name: str) -> str | None:
    """The first pattern key that PEFT would apply to `module_name`, or None.

    PEFT treats each key as a regular expression that must match the end of the module
    path at a dot boundary: `re.match(rf"(.*\\.)?({key})$", name)`; the first match wins.
    """
    for key in pattern_keys:
        try:
            if re.match(rf"(.*\.)?({key})$", module_name):
                return key
        except re.error:
            if module_name == key or module_name.endswith("." + key):
                return key
    return None


def parse_lora_key(key: str) -> tuple[str, str, str | None] | None:
    """Split a state-dict key into (module path, LoRA part, adapter name), or None.

    Handles saved keys (`base_model.model.x.lora_A.weight`, `x.lora_embedding_A`) and
    in-memory ones with an adapter-name infix (`x.lora_A.default.weight`).
    """
    m = _KEY_RE.match(key)
    if m is None:
        return None
    rest = [t for t in m.group("rest").split(".") if t]
    if rest and rest[-1] == "bias":
        return None  # `lora_bias=True` adds an output bias: not a factor of ΔW, not an adapter name
    if rest and rest[-1] == "weight":
        rest = rest[:-1]
    if len(rest) > 1:
        return None
    module = m.group("module").removeprefix(SAVED_PREFIX)
    return module, m.group("part"), (rest[0] if rest else None)


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
                f"{source}: peft_type is {peft_type}; gradience audits LoRA adapters only "
                "(LoRA, rsLoRA, DoRA)"
            )
        try:
            settings = cls(
                r=int(cfg.get("r", 8)),
                lora_alpha=float(cfg.get("lora_alpha", 8)),
                use_rslora=bool(cfg.get("use_rslora", False)),
                use_dora=bool(cfg.get("use_dora", False)),
                fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
                rank_pattern={str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()},
                alpha_pattern={str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
                target_modules=cfg.get("target_modules"),
                base_model_name_or_path=cfg.get("base_model_name_or_path"),
                task_type=cfg.get("task_type"),
                peft_type=peft_type,
                raw=dict(cfg),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise AdapterError(f"{source}: invalid LoRA setting ({exc})") from None
        if settings.r <= 0:
            raise AdapterError(f"{source}: `r` must be a positive integer, got {settings.r}")
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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return LoraSettings.from_dict(cfg, source=str(path))


class Adapter:
    """A PEFT LoRA adapter on disk, indexed from the weights header only.

    Example:
        >>> adapter = Adapter.open("runs/toy/peft")  # doctest: +SKIP
        >>> for module in adapter.modules(): ...      # doctest: +SKIP
    """

    def __init__(self, config_path: Path, weights_path: Path, settings: LoraSettings) -> None:
        self.config_path = config_path
        self.weights_path = weights_path
        self.settings = settings
        self.file = TensorFile(weights_path)
        self._index = self._build_index()

    @classmethod
    def open(
        cls,
        peft_dir: str | Path,
        adapter_config: str | Path | None = None,
        weights: str | Path | None = None,
    ) -> Adapter:
        """Open a PEFT directory; `adapter_config` / `weights` override the files in it."""
        d = Path(peft_dir)
        if not d.exists():
            raise UsageError(f"{d}: directory not found")
        if not d.is_dir():
            raise UsageError(f"{d}: not a directory (pass the folder that holds {CONFIG_NAME})")
        config_path = Path(adapter_config) if adapter_config else _find_config(d)
        weights_path = Path(weights) if weights else _find_weights(d)
        return cls(config_path, weights_path, load_settings(config_path))

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
            for frag, method in _FOREIGN_PARTS.items():
                if f".{frag}" in info.name:
                    raise UnsupportedAdapterError(
                        f"{self.weights_path}: holds {method} tensors ({info.name}); "
                        "gradience audits LoRA adapters only"
                    )
            parsed = parse_lora_key(info.name)
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
            else:
                slot["magnitude"] = info.name
        if len(adapters) > 1:
            raise UsageError(
                f"{self.weights_path}: holds several adapters ({', '.join(sorted(adapters))}); "
                "save each with save_pretrained and audit them one at a time"
            )
        if not index:
            raise AdapterError(f"{self.weights_path}: no LoRA tensors (lora_A / lora_B) found")
        return {k: _ModuleKeys(**v) for k, v in sorted(index.items(), key=lambda kv: _natural_key(kv[0]))}

    def _load(self, name: str, keys: _ModuleKeys) -> LoraModule:
        where = f"{self.weights_path}: module {name}"
        if keys.a is None or keys.b is None:
            have, lacks = ("lora_A", "lora_B") if keys.a else ("lora_B", "lora_A")
            raise AdapterError(f"{where} has {have} but no {lacks}")
        a, b = self.file.read(keys.a), self.file.read(keys.b)
        kind = "linear"
        if keys.embedding:
            # PEFT stores embedding factors as A: (r, num_embeddings), B: (dim, r) and applies
            # (B @ A).T; transposing both keeps the (r, in) / (out, r) convention.
            a, b, kind = b.T, a.T, "embedding"
        elif a.ndim > 2 or b.ndim > 2:
            a, b, kind = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), "conv"
        if a.ndim != 2 or b.ndim != 2:
            raise AdapterError(f"{where}: expected 2-D factors, got {list(a.shape)} and {list(b.shape)}")
        if a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{where}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]} (shape mismatch)"
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
        )


def _natural_key(name: str) -> list[Any]:
    """Sort `layers.10` after `layers.9`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


_ATTN = {"attn", "attention", "self_attn", "self_attention", "q_proj", "k_proj", "v_proj",
         "o_proj", "query", "key", "value", "qkv_proj", "c_attn", "wqkv", "out_proj", "wq",
         "wk", "wv", "wo", "to_q", "to_k", "to_v", "to_out"}
_MLP = {"mlp", "ffn", "feed_forward", "intermediate", "gate_proj", "up_proj", "down_proj",
        "fc1", "fc2", "c_fc", "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h", "experts",
        "gate_up_proj"}
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The transformer block a module sits in (first numeric path component), if any."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str, kind: str = "linear") -> str:
    """`attn`, `mlp`, `embed` or `other`, from the module path's components."""
    if kind == "embedding":
        return "embed"
    tokens = name.lower().split(".")
    for i, tok in enumerate(tokens):
        if tok in _ATTN:
            return "attn"
        if tok in _MLP:
            return "mlp"
        # BERT-style blocks: `layer.N.output.dense` is the MLP's down projection.
        if tok == "output" and i > 0 and tokens[i - 1].isdigit():
            return "mlp"
    return "embed" if any("embed" in t for t in tokens) else "other"
