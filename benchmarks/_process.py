"""What every whole-process benchmark here shares: one way to spawn and measure a command.

Peak RSS survives exec, so a child forked from a (large) benchmark process would report the
benchmark's size. A bare interpreter spawns the command instead and reports the child's own
wall time, CPU time and peak RSS. CPU time is printed beside wall time because on a shared
machine the wall time measures the neighbours as much as the command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_LAUNCHER = """
import os, sys, time
t = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ,
                     file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - t, usage.ru_utime + usage.ru_stime, usage.ru_maxrss,
      os.waitstatus_to_exitcode(status))
"""


@dataclass(frozen=True)
class Measured:
    wall: float  # seconds
    cpu: float  # seconds, user + system
    rss_mib: float  # peak resident set


def spawn(args: list[str], env: dict[str, str] | None = None) -> Measured:
    """Run `args` (args[0] an executable path) as a fresh process, stdout to /dev/null."""
    cmd = [sys.executable, "-S", "-c", _LAUNCHER, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    wall, cpu, rss_kib, code = out.split()
    if int(code) != 0:
        raise SystemExit(f"failed with exit code {code}: {' '.join(args)}")
    return Measured(float(wall), float(cpu), int(rss_kib) / 1024.0)


def gradience_exe() -> str:
    """The `gradience` console script of the interpreter running the benchmark."""
    return str(Path(sys.executable).parent / "gradience")


def compile_bytecode() -> str:
    """Compile our package's .pyc files, as `pip install` does for a user.

    An editable install run under PYTHONDONTWRITEBYTECODE=1 (this workplace sets it) never
    writes them, so every fresh process would recompile our sources from text: ~50 ms of a
    whole-process run that no installed copy pays.
    """
    import compileall

    import gradience

    package = Path(gradience.__file__).resolve().parent
    if not compileall.compile_dir(package, quiet=1):
        raise SystemExit(f"compiling {package} failed")
    return f"bytecode: compiled {package} (as pip install does)"


def load() -> str:
    """The 1-minute load average, for the line it is printed on."""
    return f"load {os.getloadavg()[0]:.2f}"
