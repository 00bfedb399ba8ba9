"""Training integrations: the PyTorch `Recorder`, the opt-in `Guard`, and the Trainer callback.

Both need the `hf` extra (`pip install gradience[hf]`); importing this package does not
import torch or transformers, the submodules do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradience.integrations.guard import Guard, GuardConfig
    from gradience.integrations.hf import GradienceCallback
    from gradience.integrations.recorder import Recorder

__all__ = ["GradienceCallback", "Guard", "GuardConfig", "Recorder"]


def __getattr__(name: str) -> Any:
    if name == "GradienceCallback":
        from gradience.integrations.hf import GradienceCallback

        return GradienceCallback
    if name in ("Guard", "GuardConfig"):
        from gradience.integrations import guard

        return getattr(guard, name)
    if name == "Recorder":
        from gradience.integrations.recorder import Recorder

        return Recorder
    raise AttributeError(f"module 'gradience.integrations' has no attribute {name!r}")
