"""Short import path for the Trainer callback: `from gradience_hf import GradienceCallback`."""

from gradience.integrations.guard import GuardConfig
from gradience.integrations.hf import GradienceCallback, split_eval_metrics
from gradience.integrations.trigger import TriggerPolicy

__all__ = ["GradienceCallback", "GuardConfig", "TriggerPolicy", "split_eval_metrics"]
