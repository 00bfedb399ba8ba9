"""Verify a compression with the user's own eval: a command run on each adapter.

`compress(..., verify=CommandEvaluator("python eval.py --adapter {adapter}"))` runs the
command on the original adapter, then on the compressed one, and the report holds the pair.
The command prints one JSON object with at least one number, e.g. `{"eval_loss": 0.41}`, as
its last JSON line on stdout (log lines before it are fine). The template is split like a
shell line (`shlex`) and run without a shell, `{adapter}` replaced by the adapter folder in
each argument; wrap it in `sh -c '...'` for pipes or environment settings.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradience.errors import GradienceError, UsageError

__all__ = ["PLACEHOLDER", "CommandEvaluator", "parse_metrics"]

PLACEHOLDER = "{adapter}"
_TAIL = 400  # characters of stderr quoted in an error


@dataclass(frozen=True)
class CommandEvaluator:
    """`evaluator(adapter_dir)` -> the numbers the command printed for that adapter.

    Raises (on construction):
        UsageError: the template is empty, does not parse, or has no `{adapter}`.
    """

    template: str
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        try:
            argv = shlex.split(self.template)
        except ValueError as exc:
            raise UsageError(f"--verify-cmd {self.template!r} does not parse: {exc}") from exc
        if not argv or not any(PLACEHOLDER in a for a in argv):
            raise UsageError(f"--verify-cmd needs {PLACEHOLDER} where the adapter folder goes, "
                             f"e.g. \"python eval.py --adapter {PLACEHOLDER}\"; got {self.template!r}")  # fmt: skip

    @property
    def description(self) -> str:
        return f"command: {self.template}"

    def argv(self, adapter_dir: str | Path) -> list[str]:
        return [a.replace(PLACEHOLDER, str(adapter_dir)) for a in shlex.split(self.template)]

    def __call__(self, adapter_dir: str | Path) -> dict[str, float]:
        argv = self.argv(adapter_dir)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except FileNotFoundError as exc:
            raise UsageError(f"--verify-cmd: {argv[0]!r} not found ({exc.strerror})") from exc
        except subprocess.TimeoutExpired as exc:
            raise GradienceError(f"--verify-cmd on {adapter_dir} ran past {self.timeout_s:g} s") from exc
        if done.returncode != 0:
            tail = done.stderr.strip()[-_TAIL:]
            raise GradienceError(f"--verify-cmd on {adapter_dir} exited {done.returncode}"
                                 + (f": {tail}" if tail else ""))  # fmt: skip
        return parse_metrics(done.stdout, f"--verify-cmd on {adapter_dir}")


def parse_metrics(stdout: str, where: str = "the command") -> dict[str, float]:
    """The numbers of the last JSON object line in `stdout` (bools, strings, NaN left out).

    Raises:
        GradienceError: no line is a JSON object, or the object holds no finite number.

    Example:
        >>> parse_metrics('loading...\\n{"eval_loss": 0.41, "split": "test"}\\n')
        {'eval_loss': 0.41}
    """
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            numbers = {str(k): float(v) for k, v in obj.items() if _is_number(v)}
            if not numbers:
                raise GradienceError(f"{where} printed {line[:200]}, which holds no finite number")
            return numbers
    raise GradienceError(f"{where} printed no JSON object line; it must print e.g. {{\"eval_loss\": 0.41}}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
