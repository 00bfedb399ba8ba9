"""Suite-wide settings.

Property and fuzz tests run derandomized by default, so CI sees the same examples on every
run and a failure reproduces; `HYPOTHESIS_PROFILE=explore` draws fresh examples instead.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
