"""Reading what `gradience check` judges: the training-arguments snapshot and the model config.

Both are JSON a user may have edited by hand, so every field is read defensively: a missing
or non-numeric value becomes None and the rule that needs it says it was skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradience._io import read_json_object
from gradience.errors import UsageError
from gradience.preflight.profiles import ModelInfo

TRAINING_ARGS_NAME = "training_args.json"  # `TrainingArguments.to_dict()` as JSON
TRAINER_STATE_NAME = "trainer_state.json"  # a Trainer checkpoint's state: holds the run's max_steps
MODEL_CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class TrainingSnapshot:
    """The training arguments the rules use; None where the snapshot lacks a key."""

    path: str
    learning_rate: float | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    world_size: int | None = None  # not in `TrainingArguments.to_dict()`; add it to the JSON when > 1
    effective_batch_size: int | None = None  # per device × accumulation × world size (1 when unknown)
    num_train_epochs: float | None = None
    max_steps: int | None = None
    total_steps: int | None = None  # max_steps when > 0, else the trainer state's, else unknown
    warmup_ratio: float | None = None
    warmup_steps: int | None = None
    weight_decay: float | None = None
    lr_scheduler_type: str | None = None


def locate_file(path: Path, name: str, what: str) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"{path}: not found (pass the folder that holds {name}, or the file)")
    if (path / name).is_file():
        return path / name
    raise UsageError(f"{path}: no {what} (looked for {name}){trainer_config_hint(path)}")


def finite_number(value: Any, kind: type = float) -> Any:
    """`value` as `kind` when it is a finite number (not a bool or a string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return kind(value)


def load_training_args(training_dir: str | Path) -> TrainingSnapshot:
    """Read a `TrainingArguments.to_dict()` snapshot; absent or non-numeric keys become None."""
    path = locate_file(Path(training_dir), TRAINING_ARGS_NAME, "training arguments snapshot")
    return training_snapshot(read_json_object(path), path)


def training_snapshot(args: Mapping[str, Any], path: Path) -> TrainingSnapshot:
    """The rules' view of training arguments read from `path` (a trainer state beside it gives max_steps)."""
    ints = {k: finite_number(args.get(k), int) for k in (
        "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "max_steps", "warmup_steps")}
    total = ints["max_steps"] if (ints["max_steps"] or 0) > 0 else None
    if total is None and (path.parent / TRAINER_STATE_NAME).is_file():
        total = finite_number(read_json_object(path.parent / TRAINER_STATE_NAME).get("max_steps"), int)
    per_device = ints["per_device_train_batch_size"]
    batch = per_device * (ints["gradient_accumulation_steps"] or 1) * (ints["world_size"] or 1) if per_device else None
    scheduler = args.get("lr_scheduler_type")
    return TrainingSnapshot(
        path=str(path), learning_rate=finite_number(args.get("learning_rate")), effective_batch_size=batch,
        num_train_epochs=finite_number(args.get("num_train_epochs")), total_steps=total,
        warmup_ratio=finite_number(args.get("warmup_ratio")), weight_decay=finite_number(args.get("weight_decay")),
        lr_scheduler_type=scheduler if isinstance(scheduler, str) else None, **ints,
    )


# Axolotl's names for TrainingArguments fields (TRL configs use the TrainingArguments names).
_AXOLOTL_TRAINING = {"micro_batch_size": "per_device_train_batch_size", "num_epochs": "num_train_epochs",
                     "lr_scheduler": "lr_scheduler_type"}  # fmt: skip
# TRL `ModelConfig` and axolotl LoRA keys -> adapter_config.json fields.
_LORA_KEYS = {
    "lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
    "lora_target_modules": "target_modules", "use_rslora": "use_rslora", "peft_use_rslora": "use_rslora",
    "use_dora": "use_dora", "peft_use_dora": "use_dora", "lora_task_type": "task_type",
    "lora_modules_to_save": "modules_to_save",
}  # fmt: skip
_BASE_MODEL_KEYS = ("base_model", "model_name_or_path")


@dataclass(frozen=True)
class TrainConfig:
    """A training config file read before any training: LoRA settings, arguments, base model."""

    path: str
    adapter_config: dict[str, Any] | None  # adapter_config.json fields; None: no LoRA keys
    training: TrainingSnapshot
    base_model: str | None


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a TRL (`trl sft --config`) or axolotl YAML, or the same as JSON.

    LoRA settings come from `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`
    (or axolotl's `lora_target_linear: true` = all-linear), or from a nested `peft_config`
    mapping of adapter_config.json fields; training arguments from TrainingArguments names,
    with axolotl's `micro_batch_size`, `num_epochs` and `lr_scheduler` mapped to them.

    Raises:
        UsageError: missing file, unreadable YAML/JSON, not a mapping, or YAML without PyYAML.
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{file}: training config not found")
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"{file}: reading YAML needs PyYAML: pip install 'gradience[yaml]' (or pass JSON)") from None
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UsageError(f"{file}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{file}: expected a mapping of training arguments at the top level")
    else:
        data = read_json_object(file)
    args = {_AXOLOTL_TRAINING.get(k, k): v for k, v in data.items()}
    lora: dict[str, Any] | None = None
    nested = data.get("peft_config")
    if isinstance(nested, dict):
        lora = dict(nested)
    elif any(k in data for k in _LORA_KEYS) or data.get("adapter") in ("lora", "qlora"):
        lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 8}  # PEFT's defaults for absent keys
        lora.update({_LORA_KEYS[k]: v for k, v in data.items() if k in _LORA_KEYS})
        if data.get("lora_target_linear") is True:
            lora["target_modules"] = "all-linear"
    base = next((data[k] for k in _BASE_MODEL_KEYS if isinstance(data.get(k), str)), None)
    return TrainConfig(str(file), lora, training_snapshot(args, file), base)


def load_model_config(model_config: str | Path | None, search: list[str | Path]) -> ModelInfo | None:
    """The model's module naming from `model_config`, else a `config.json` in `search`, else None."""
    candidates = [Path(d) / MODEL_CONFIG_NAME for d in search if Path(d).is_dir()]
    if model_config is not None:
        given = Path(model_config)
        candidates = [given / MODEL_CONFIG_NAME if given.is_dir() else given]
        if not candidates[0].is_file():
            raise UsageError(f"{candidates[0]}: model config not found")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    return ModelInfo.from_config(str(path), read_json_object(path))


def trainer_config_hint(path: Path) -> str:
    """The hint for a folder that has a Trainer's pickle but no JSON snapshot."""
    return ("; the Gradience callback writes training_args.json into its out_dir at train begin, "
            "or save `TrainingArguments.to_dict()` as training_args.json") if (path / "training_args.bin").is_file() else ""
