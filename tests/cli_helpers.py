"""Assertions shared by the tests that run the CLI as a real subprocess."""

from __future__ import annotations

import subprocess


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """A user mistake: one `Error: ...` line on stderr naming each fragment, no traceback, no stdout."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert proc.stdout == ""
    return lines[0]
