"""One rule for what a command's main input means, so every command reads the same way.

- a run folder (holding `run.jsonl`) means its `run.jsonl`, for the log commands (monitor,
  analyze, plot, report);
- a folder holding `adapter_config.json` is a PEFT adapter, for the adapter commands (audit,
  check, compress, compare, merge);
- a single `.safetensors` file is a single-file adapter (kohya / diffusers keys, or PEFT
  weights with an adapter_config.json beside it).

Every command takes that input positionally; the adapter commands keep `--peft-dir` as an
alias. A path that fits no rule is refused with the same hint everywhere: what was found
there and the exact path to pass instead.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradience.errors import UsageError

LOG_NAME = "run.jsonl"
CONFIG_NAME = "adapter_config.json"


@dataclass(frozen=True)
class AdapterInput:
    """A resolved adapter argument: a PEFT folder, or one weights file (single-file mode)."""

    peft_dir: str | None
    weights: str | None

    @property
    def path(self) -> str:
        return str(self.peft_dir or self.weights)


def add_input_argument(p: argparse.ArgumentParser, dest: str, metavar: str, alias: str, help: str) -> None:
    """A positional main input plus its older flag spelling `alias` (either one, not both)."""
    p.add_argument(dest, nargs="?", metavar=metavar, help=f"{help} (alias: {alias} {metavar})")
    p.add_argument(alias, dest=f"{dest}_alias", metavar=metavar, help=argparse.SUPPRESS)


def input_arg(args: argparse.Namespace, dest: str, alias: str, example: str) -> str:
    """The main input from either spelling; UsageError when both differ or neither is given."""
    positional, flagged = getattr(args, dest, None), getattr(args, f"{dest}_alias", None)
    if positional and flagged and Path(positional) != Path(flagged):
        raise UsageError(f"two inputs given ({positional} and {alias} {flagged}); pass one")
    value = positional or flagged
    if value is None:
        raise UsageError(f"no input given; pass {example}")
    return str(value)


def add_adapter_argument(p: argparse.ArgumentParser, help: str) -> None:
    """The positional ADAPTER plus its `--peft-dir` alias."""
    add_input_argument(p, "adapter", "ADAPTER", "--peft-dir", help)


def adapter_arg(args: argparse.Namespace) -> str:
    """The adapter path from either spelling."""
    return input_arg(args, "adapter", "--peft-dir", "an adapter folder or a .safetensors file, e.g. runs/toy/peft")


def resolve_adapter(path: str | Path) -> AdapterInput:
    """Apply the rule to an adapter argument.

    Raises:
        UsageError: the path does not exist, or is a folder without an adapter (the hint
            names the adapter folders found one level down, e.g. a run folder's `peft/`).

    Example:
        >>> resolve_adapter("runs/toy/peft")  # doctest: +SKIP
        AdapterInput(peft_dir='runs/toy/peft', weights=None)
    """
    p = Path(path)
    if p.is_file():
        if p.name == CONFIG_NAME:  # the config file itself: its folder is the adapter
            return AdapterInput(str(p.parent), None)
        if p.suffix == ".safetensors":
            return AdapterInput(None, str(p))
        raise UsageError(f"{p}: not an adapter; pass a folder with {CONFIG_NAME} or a .safetensors file")
    if p.is_dir():
        if (p / CONFIG_NAME).is_file():
            return AdapterInput(str(p), None)
        nested = sorted(str(c.parent) for c in p.glob(f"*/{CONFIG_NAME}"))
        if nested:
            raise UsageError(f"{p}: no {CONFIG_NAME} here; the adapter is in a subfolder: pass {nested[0]}")
        raise UsageError(f"{p}: no {CONFIG_NAME}; pass a PEFT adapter folder or a .safetensors file")
    raise UsageError(f"{p}: adapter not found")


def resolve_log(path: str | Path) -> str:
    """A run folder means its run.jsonl; a file is itself.

    Raises:
        UsageError: missing path, or a folder without run.jsonl (the hint names the log
            files found in it, or one level down).
    """
    p = Path(path)
    if p.is_dir():
        if (p / LOG_NAME).is_file():
            return str(p / LOG_NAME)
        found = sorted(str(c) for c in [*p.glob("*.jsonl"), *p.glob(f"*/{LOG_NAME}")])
        hint = f"; pass {found[0]}" if found else ""
        raise UsageError(f"{p}: a folder without {LOG_NAME}{hint}")
    if not p.exists():
        raise UsageError(f"{p}: run log not found")
    return str(p)


def add_log_argument(p: argparse.ArgumentParser, many: bool = False) -> None:
    """The positional RUN (a run.jsonl, or the run folder holding it)."""
    help = "run log (run.jsonl) or the run folder holding it"
    if many:
        p.add_argument("runs", nargs="+", metavar="RUN", help=help + "; several = seeds or runs to compare")
    else:
        p.add_argument("run_jsonl", metavar="RUN", help=help)


def check_names(names: Sequence[str], known: Iterable[str], what: str = "metric") -> list[str]:
    """Refuse names outside `known` with a did-you-mean; returns the names, order kept.

    Example:
        >>> check_names(["stable_rank"], ["stable_rank", "sigma_max"])
        ['stable_rank']
    """
    choices = list(known)
    for name in names:
        if name not in choices:
            close = difflib.get_close_matches(name, choices, n=1)
            maybe = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"unknown {what} {name!r}; {maybe}choose from {', '.join(choices)}")
    return list(names)


def split_names(values: Sequence[str]) -> list[str]:
    """`--metrics a b,c` -> ['a', 'b', 'c']."""
    return [m for arg in values for m in arg.split(",") if m]


def add_top_argument(p: argparse.ArgumentParser, default: int = 20) -> None:
    p.add_argument("--top", type=int, default=default, metavar="N",
                   help=f"list the N modules that matter most (default {default}; 0: all); totals cover every module")  # fmt: skip


def top(items: Sequence[Any], n: int) -> tuple[list[Any], int]:
    """The first `n` items (all when n <= 0) and how many were left out."""
    if n <= 0 or len(items) <= n:
        return list(items), 0
    return list(items[:n]), len(items) - n
