"""LoRA fine-tuning of all-MiniLM-L6-v2 on fresh/rotten review sentences, through `transformers.Trainer`.

The demo task every example, benchmark and experiment shares: small enough to train on two
CPU cores in about a minute and a half, real enough that the adapter learns (test accuracy
near 0.8 against a majority-class rate of 0.5 with the defaults).

`train_demo` writes:

    out_dir/peft/            adapter_config.json, adapter_model.safetensors (PEFT `save_pretrained`)
    out_dir/training/        training_args.json, demo_config.json, result.json, log_history.json,
                             config.json (the base model's config)

Every eval scores two splits of the same size, the test split and a subset of the train split,
so metrics come out as `eval_test_loss`, `eval_test_accuracy`, `eval_train_loss`,
`eval_train_accuracy` (Trainer prefixes a dict-valued `eval_dataset` by its keys).
torch, transformers and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradience._io import write_json
from gradience.demo.config import DEFAULT_TARGET_MODULES, DemoConfig, DemoResult
from gradience.demo.data import majority_rate, split_reviews
from gradience.demo.model import load_classifier, quiet_transformers
from gradience.errors import GradienceError, UsageError, require

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainerCallback

__all__ = ["DEFAULT_TARGET_MODULES", "DemoConfig", "DemoResult", "evaluate_adapter", "train_demo"]

EVAL_SPLITS = ("test", "train")


class _ReviewDataset:
    """Pre-tokenised sentences as the dicts `DataCollatorWithPadding` expects (map-style)."""

    def __init__(
        self, rows: Sequence[tuple[str, int]], tokenizer: PreTrainedTokenizerBase, max_length: int
    ):
        encoded = tokenizer([text for text, _ in rows], truncation=True, max_length=max_length)
        self._items = [
            {"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, (_, label) in zip(
                encoded["input_ids"], encoded["attention_mask"], rows, strict=True
            )
        ]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._items[index]


def train_demo(
    out_dir: str | Path,
    config: DemoConfig | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    *,
    training_overrides: Mapping[str, Any] | None = None,
) -> DemoResult:
    """Fine-tune a LoRA adapter on the demo task and save it.

    Args:
        out_dir: Run folder; `peft/` and `training/` are created inside (existing files are overwritten).
        config: Hyperparameters; `None` uses `DemoConfig()`.
        callbacks: `transformers.TrainerCallback` instances (e.g. Gradience's), added to the Trainer.
        training_overrides: Extra `TrainingArguments` keywords that win over the demo's, e.g.
            `{"save_strategy": "steps", "save_steps": 40}` to keep checkpoints in `out_dir/training/checkpoint-*`.

    Returns:
        A `DemoResult` with the final train/test loss and accuracy and the paths written.

    Raises:
        MissingDependencyError: torch, transformers, peft or a demo package is missing.
        UsageError: a bad config value or an unavailable `device`.

    Example:
        >>> result = train_demo("runs/toy", DemoConfig(max_steps=20))
        >>> (result.peft_dir / "adapter_config.json").is_file()
        True
    """
    for module in ("torch", "transformers", "peft"):
        require(module, "hf")
    config = config if config is not None else DemoConfig()
    out = Path(out_dir).resolve()
    started = time.perf_counter()
    train_rows, test_rows = split_reviews(config.n_train, config.n_test, seed=config.seed)
    with _torch_threads(config), quiet_transformers():
        trainer = _build_trainer(
            out, config, train_rows, test_rows, callbacks, training_overrides or {}
        )
        trainer.train()
    final = _final_metrics(trainer.state.log_history, trainer.state.global_step)
    peft_dir, training_dir = out / "peft", out / "training"
    trainer.model.save_pretrained(str(peft_dir))
    result = DemoResult(
        out_dir=out,
        peft_dir=peft_dir,
        training_dir=training_dir,
        steps=trainer.state.global_step,
        train_loss=final["eval_train_loss"],
        train_accuracy=final["eval_train_accuracy"],
        test_loss=final["eval_test_loss"],
        test_accuracy=final["eval_test_accuracy"],
        majority_rate=majority_rate(test_rows),
        n_train=len(train_rows),
        n_test=len(test_rows),
        wall_time_s=round(time.perf_counter() - started, 3),
        metrics=final,
    )
    training_dir.mkdir(parents=True, exist_ok=True)
    write_json(training_dir / "training_args.json", trainer.args.to_dict())
    write_json(training_dir / "demo_config.json", config.to_dict())
    write_json(training_dir / "log_history.json", trainer.state.log_history)
    write_json(training_dir / "result.json", result.to_dict())
    # The base model's own config, so `gradience check` can confirm the targets exist in it.
    write_json(training_dir / "config.json", trainer.model.base_model.model.config.to_dict())
    return result


def _build_trainer(
    out: Path,
    config: DemoConfig,
    train_rows: Sequence[tuple[str, int]],
    test_rows: Sequence[tuple[str, int]],
    callbacks: Sequence[TrainerCallback],
    overrides: Mapping[str, Any],
) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(config.seed)  # before the head and LoRA A are initialised
    model, tokenizer = load_classifier(num_labels=2)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # PEFT adds the `classifier` head to modules_to_save
        r=config.rank,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.target_modules),
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        rank_pattern=dict(config.rank_pattern),
    )
    peft_model = get_peft_model(model, lora)
    args = {
        "output_dir": str(out / "training"),  # only written to if checkpoints are asked for
        "max_steps": config.max_steps,
        "learning_rate": config.learning_rate,
        "warmup_steps": config.warmup_steps,
        "lr_scheduler_type": "linear",
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.eval_batch_size,
        "eval_strategy": "steps",
        "eval_steps": config.eval_steps,
        "logging_strategy": "steps",
        "logging_steps": config.logging_steps,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": config.device == "cpu",
        "seed": config.seed,
        "data_seed": config.seed,
        "dataloader_num_workers": 0,
    }
    train_eval_rows = train_rows[: config.n_train_eval or len(test_rows)]
    trainer = Trainer(
        model=peft_model,
        args=TrainingArguments(**{**args, **overrides}),
        train_dataset=_ReviewDataset(train_rows, tokenizer, config.max_length),
        eval_dataset={
            "test": _ReviewDataset(test_rows, tokenizer, config.max_length),
            "train": _ReviewDataset(train_eval_rows, tokenizer, config.max_length),
        },
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=_accuracy,
        callbacks=[*callbacks, _eval_at_end_callback()],
    )
    trainer.remove_callback(PrinterCallback)  # it would print every log dict to stdout
    return trainer


def evaluate_adapter(
    peft_dir: str | Path,
    n_test: int = DemoConfig.n_test,
    seed: int = DemoConfig.seed,
    *,
    max_length: int = DemoConfig.max_length,
    batch_size: int = DemoConfig.eval_batch_size,
    device: str = "cpu",
) -> dict[str, float]:
    """Score a saved demo adapter on the demo test split (the one `train_demo` used for the same n_test/seed).

    Args:
        peft_dir: A PEFT adapter directory written by `train_demo` (or a compressed copy of one).
        n_test: Test split size, as in `DemoConfig.n_test`.
        seed: Split seed, as in `DemoConfig.seed`.
        max_length: Truncation length, as in `DemoConfig.max_length`.
        batch_size: Sentences per forward pass.
        device: torch device string.

    Returns:
        `{"loss": mean cross-entropy, "accuracy": ..., "majority_rate": ..., "n": n_test}`.

    Raises:
        UsageError: `peft_dir` has no adapter_config.json.
        GradienceError: PEFT cannot load the adapter onto the demo model.

    Example:
        >>> evaluate_adapter("runs/toy/peft")["accuracy"] > 0.6
        True
    """
    for module in ("torch", "transformers", "peft"):
        require(module, "hf")
    path = Path(peft_dir).resolve()
    if not (path / "adapter_config.json").is_file():
        raise UsageError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
    import torch
    from peft import PeftModel

    _, test_rows = split_reviews(1, n_test, seed=seed)
    base, tokenizer = load_classifier(num_labels=2)
    try:
        with quiet_transformers():
            model = PeftModel.from_pretrained(base, str(path))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise GradienceError(
            f"{path}: cannot load the adapter onto all-MiniLM-L6-v2 ({exc})"
        ) from exc
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(test_rows), batch_size):
            batch = test_rows[start : start + batch_size]
            enc = tokenizer(
                [t for t, _ in batch],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            labels = torch.tensor([y for _, y in batch], device=device)
            logits = model(**enc).logits.float()
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum().item())
    n = len(test_rows)
    return {
        "loss": loss_sum / n,
        "accuracy": correct / n,
        "majority_rate": majority_rate(test_rows),
        "n": n,
    }


def _accuracy(eval_pred: Any) -> dict[str, float]:
    import numpy as np

    logits = eval_pred.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_pred.label_ids).mean())}


def _eval_at_end_callback() -> TrainerCallback:
    """A callback that asks for an eval at the last step (recent Trainers do; older ones did not)."""
    from transformers import TrainerCallback

    class _EvalAtEnd(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step >= state.max_steps:
                control.should_evaluate = True
            return control

    return _EvalAtEnd()


def _final_metrics(log_history: Sequence[Mapping[str, Any]], step: int) -> dict[str, float]:
    """Merge the last eval records of both splits, which must be from the final step."""
    merged: dict[str, float] = {}
    for split in EVAL_SPLITS:
        key = f"eval_{split}_loss"
        record = next((r for r in reversed(log_history) if key in r), None)
        if record is None or record.get("step") != step:
            raise GradienceError(
                f"the Trainer logged no `{key}` at the final step {step}; was eval disabled?"
            )
        merged.update({k: float(v) for k, v in record.items() if k.startswith(f"eval_{split}_")})
    return merged


@contextlib.contextmanager
def _torch_threads(config: DemoConfig) -> Iterator[None]:
    """Use `num_threads` torch threads inside the block (all usable cores when 0), then restore."""
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("`device` is 'cuda' but torch sees no CUDA device; use --device cpu")
    if config.device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("`device` is 'mps' but torch sees no MPS device; use --device cpu")
    before = torch.get_num_threads()
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    torch.set_num_threads(config.num_threads or cores)
    try:
        yield
    finally:
        torch.set_num_threads(before)
