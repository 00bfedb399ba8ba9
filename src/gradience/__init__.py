"""Gradience: a flight recorder and a mechanic for LoRA fine-tuning.

`import gradience` stays light (numpy only); torch and transformers are imported
only by the training integrations that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["GradienceError", "__version__", "audit"]

from gradience.errors import GradienceError

if TYPE_CHECKING:
    from gradience.audit import audit


def __getattr__(name: str) -> Any:
    # Lazy so that `import gradience` does not pay for the audit path's imports.
    if name == "audit":
        from gradience.audit import audit

        return audit
    raise AttributeError(f"module 'gradience' has no attribute {name!r}")
