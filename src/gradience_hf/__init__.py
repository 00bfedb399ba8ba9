"""Short import path for the Trainer callback: `from gradience_hf import GradienceCallback`."""

from gradience.integrations.hf import GradienceCallback, split_eval_metrics

__all__ = ["GradienceCallback", "split_eval_metrics"]
