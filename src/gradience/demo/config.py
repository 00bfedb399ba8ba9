"""The demo run's settings (`DemoConfig`, validated on construction) and what it measured.

Separate from `gradience.demo.train` so the settings can be built, validated and printed
without torch or transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradience.errors import UsageError

# BERT names its attention projections `...attention.self.{query,key,value}` and the attention
# output projection `...attention.output.dense`; a bare "dense" would also catch the MLP and pooler.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("query", "key", "value", "attention.output.dense")
DEVICES = ("cpu", "cuda", "mps")

@dataclass
class DemoConfig:
    """Hyperparameters of the demo run; the defaults train in ~1.5 min on 2 CPU cores."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r of every targeted module."})
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."}
    )
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={
            "help": "Module name suffixes that get LoRA (PEFT matching); default: all attention projections."
        },
    )
    lora_dropout: float = field(
        default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."}
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "Scale by alpha / sqrt(r) instead of alpha / r."}
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Per-module rank overrides, PEFT `rank_pattern` semantics."},
    )
    learning_rate: float = field(
        default=2e-3, metadata={"help": "Peak AdamW learning rate (linear decay)."}
    )
    warmup_steps: int = field(default=10, metadata={"help": "Linear warmup steps."})
    max_steps: int = field(default=120, metadata={"help": "Optimizer steps to train."})
    batch_size: int = field(default=16, metadata={"help": "Training sentences per step."})
    eval_batch_size: int = field(default=64, metadata={"help": "Sentences per eval forward pass."})
    max_length: int = field(
        default=64,
        metadata={"help": "Tokens per sentence after truncation (batches pad dynamically)."},
    )
    n_train: int = field(default=2000, metadata={"help": "Training sentences (class-balanced)."})
    n_test: int = field(
        default=300,
        metadata={"help": "Test sentences (class-balanced)."},
    )
    n_train_eval: int = field(
        default=100,
        metadata={
            "help": "Training sentences the train-split eval scores (the first of the train split); "
            "0 = as many as n_test."
        },
    )
    eval_steps: int = field(
        default=10,
        metadata={
            "help": "Evaluate both splits every this many steps (and at the end); 10 matches the "
            "structural snapshot cadence, so analysis has one matched point per eval."
        },
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Log the training loss every this many steps."}
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the data split, LoRA init, head init and batch order."},
    )
    device: str = field(default="cpu", metadata={"help": "`cpu`, `cuda` or `mps`."})
    num_threads: int = field(
        default=0,
        metadata={"help": "torch CPU threads during the run; 0 = every core this process may use."},
    )

    def __post_init__(self) -> None:
        for name in (
            "rank",
            "max_steps",
            "batch_size",
            "eval_batch_size",
            "max_length",
            "n_train",
            "n_test",
            "eval_steps",
            "logging_steps",
        ):
            check_int(name, getattr(self, name), minimum=1)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_int("num_threads", self.num_threads, minimum=0)
        check_int("n_train_eval", self.n_train_eval, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_int("lora_alpha", self.lora_alpha, minimum=1)
        if not is_number(self.learning_rate) or self.learning_rate <= 0:
            raise UsageError(
                f"`learning_rate` must be a positive number, got {self.learning_rate!r}"
            )
        if not is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise UsageError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise UsageError(
                f"`target_modules` must be a non-empty list of names, got {self.target_modules!r}"
            )
        self.target_modules = list(self.target_modules)
        if not all(isinstance(m, str) and m for m in self.target_modules):
            raise UsageError(
                f"`target_modules` must hold non-empty strings, got {self.target_modules!r}"
            )
        for key, value in self.rank_pattern.items():
            check_int(f"rank_pattern[{key!r}]", value, minimum=1)
        if self.device not in DEVICES:
            raise UsageError(f"`device` must be one of {', '.join(DEVICES)}, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-safe dict (lists and dicts copied)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass(frozen=True)
class DemoResult:
    """What `train_demo` measured and wrote; losses and accuracies are from the final eval."""

    out_dir: Path
    peft_dir: Path
    training_dir: Path
    steps: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    majority_rate: float
    n_train: int
    n_test: int
    wall_time_s: float
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view: paths as strings."""
        out = dataclasses.asdict(self)
        for key in ("out_dir", "peft_dir", "training_dir"):
            out[key] = str(out[key])
        return out


def check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UsageError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
