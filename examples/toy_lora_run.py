"""The demo run, at the path the README used before the article's: runs examples/vnext/toy_lora_run.py.

    python examples/toy_lora_run.py --out runs/toy --device cpu
"""

from __future__ import annotations

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).parent / "vnext" / "toy_lora_run.py"), run_name="__main__")
