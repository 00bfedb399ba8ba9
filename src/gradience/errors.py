"""One exception family for the whole library.

The CLI maps these to exit codes: `UsageError` means the user asked for something
impossible (exit 2); every other `GradienceError` means the data is bad (exit 1).
Messages say what failed, where (file, module key) and what to do about it.
"""

from __future__ import annotations


class GradienceError(Exception):
    """Base class of every error the library raises on purpose."""

    exit_code = 1


class UsageError(GradienceError):
    """A missing path, a bad flag value or an unsupported option: the caller can fix it."""

    exit_code = 2


class AdapterError(GradienceError):
    """An adapter directory, config or weights file that cannot be read as LoRA."""


class UnsupportedAdapterError(AdapterError):
    """A PEFT method that is not LoRA (LoHa, LoKr, VeRA, IA3, AdaLoRA, ...)."""

    exit_code = 2


class TelemetryError(GradienceError):
    """A run log that cannot be read or written."""


class MissingDependencyError(GradienceError, ImportError):
    """An optional dependency is absent; the message names the extra to install."""

    exit_code = 2


def require(module: str, extra: str) -> None:
    """Raise `MissingDependencyError` naming `pip install gradience[extra]` when `module` is absent."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"{module} is not installed; install it with `pip install gradience[{extra}]`"
        )


class AuditFileError(GradienceError):
    """A saved `gradience audit --json` output that cannot be read."""


class ClusterError(GradienceError):
    """A compute cluster (a Dask scheduler) that cannot be reached or used."""
