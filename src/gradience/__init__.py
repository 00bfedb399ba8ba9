"""Gradience: a flight recorder and a mechanic for LoRA fine-tuning.

`import gradience` stays light (no numpy until a command needs it, never torch), so the
CLI can set its BLAS threading before numpy loads. Each command's function is reachable
from here and is imported on first use.

Example:
    >>> import gradience
    >>> report = gradience.audit("runs/toy/peft")  # doctest: +SKIP
    >>> summary = gradience.monitor("runs/toy/run.jsonl")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradience.errors import GradienceError

__version__ = "0.1.0"

# public name -> (module, attribute). No module here shares a name with a function, so
# `gradience.audit` is always the function, whatever has been imported before.
_API: dict[str, tuple[str, str]] = {
    "audit": ("gradience.mechanic.audit", "audit"),
    "audit_many": ("gradience.mechanic.audit_many", "audit_many"),
    "compress": ("gradience.mechanic.compress", "compress"),
    "compare": ("gradience.mechanic.compare", "compare"),
    "merge": ("gradience.mechanic.merge", "merge"),
    "explain": ("gradience.mechanic.explain", "explain"),
    "run_bench": ("gradience.mechanic.bench", "run_bench"),
    "monitor": ("gradience.runlog.monitor", "monitor"),
    "plot_run": ("gradience.runlog.plot", "plot_run"),
    "build_report": ("gradience.runlog.report_html", "build_report"),
    "check": ("gradience.preflight.check", "check"),
    "analyze": ("gradience.analysis.report", "analyze"),
}

__all__ = [
    "GradienceError",
    "__version__",
    "analyze",
    "audit",
    "audit_many",
    "build_report",
    "check",
    "compare",
    "compress",
    "explain",
    "merge",
    "monitor",
    "plot_run",
    "run_bench",
]

if TYPE_CHECKING:
    from gradience.analysis.report import analyze
    from gradience.mechanic.audit import audit
    from gradience.mechanic.audit_many import audit_many
    from gradience.mechanic.bench import run_bench
    from gradience.mechanic.compare import compare
    from gradience.mechanic.compress import compress
    from gradience.mechanic.explain import explain
    from gradience.mechanic.merge import merge
    from gradience.preflight.check import check
    from gradience.runlog.monitor import monitor
    from gradience.runlog.plot import plot_run
    from gradience.runlog.report_html import build_report


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradience' has no attribute {name!r}")
