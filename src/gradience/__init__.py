"""Gradience: a flight recorder and a mechanic for LoRA fine-tuning.

`import gradience` stays light (no numpy until a command needs it, never torch), so the
CLI can set its BLAS threading before numpy loads.

Example:
    >>> import gradience
    >>> report = gradience.audit("runs/toy/peft")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradience.errors import GradienceError

__version__ = "0.1.0"

__all__ = ["GradienceError", "__version__", "audit"]

if TYPE_CHECKING:
    from gradience.audit import audit


def __getattr__(name: str) -> Any:
    if name == "audit":
        from gradience.audit import audit

        return audit
    raise AttributeError(f"module 'gradience' has no attribute {name!r}")
