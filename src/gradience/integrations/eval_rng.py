"""Keep evals out of the training's random stream.

A Trainer eval draws from the global torch RNG (its dataloader takes a base seed from it),
so without isolation two runs that differ only in *when* they evaluate draw different dropout
masks afterwards and train apart like two seeds: an eval schedule would change the model it
measures. `EvalRngGuard` saves the torch RNG states (CPU and every CUDA device) when a step
ends with an eval and puts them back after each eval split, as if no eval had run.
"""

from __future__ import annotations

from typing import Any


class EvalRngGuard:
    """Save the torch RNG before an eval (`save`), restore it after each split (`restore`).

    Keyed by step: an eval at a step nothing was saved for (a callback after Gradience's asked
    for it) is left alone rather than rewound to an older state.
    """

    def __init__(self) -> None:
        self._step: int | None = None
        self._cpu: Any = None
        self._cuda: list[Any] | None = None

    def save(self, step: int) -> None:
        import torch

        self._step = step
        self._cpu = torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self, step: int) -> None:
        if self._cpu is None or step != self._step:
            return
        import torch

        torch.set_rng_state(self._cpu)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)
