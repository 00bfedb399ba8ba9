"""PEFT's LoRA scale: the one home of the formula every reader, writer and check uses."""

from __future__ import annotations

import math


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's scaling at rank r: alpha / r, or alpha / √r with rsLoRA (kohya: alpha / r).

    Example:
        >>> lora_scale(16, 4), lora_scale(16, 4, use_rslora=True)
        (4.0, 8.0)
    """
    return alpha / math.sqrt(r) if use_rslora else alpha / r
