"""Auditing every adapter under a folder, in parallel worker processes.

`find_adapters(root)` lists the folders that hold an `adapter_config.json`;
`audit_many(root)` audits each in a pool of processes, or on any `concurrent.futures.Executor`
a caller passes (a Dask cluster's: `gradience.mechanic.cluster`), and yields one
`AdapterResult` per folder, in path order. A broken adapter gives a result with its error and never stops the
others. Each worker runs single-threaded BLAS: the audit is many small QRs, where BLAS
threads buy nothing and oversubscribe the cores the other workers are using.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from gradience.errors import GradienceError, UsageError
from gradience.lora.reader import CONFIG_NAME
from gradience.mechanic.audit import AuditReport, audit
from gradience.naming import natural_key

_BLAS_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
MAX_DEFAULT_WORKERS = 4


@dataclass(frozen=True)
class AdapterResult:
    """The audit of one adapter folder, or why it failed (`ok` False, `error` one line)."""

    path: str
    ok: bool
    report: AuditReport | None = None
    error: str | None = None

    def to_dict(self, include_modules: bool = False) -> dict[str, Any]:
        """`{"path", "ok", "report"}` or `{"path", "ok", "error"}`: one JSON line of `--recursive`."""
        if self.report is not None:
            return {"path": self.path, "ok": True, "report": self.report.to_dict(include_modules)}
        return {"path": self.path, "ok": False, "error": self.error}


def default_workers() -> int:
    """min(CPU count, 4): more processes than that mostly wait on the disk."""
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


def find_adapters(root: str | os.PathLike[str]) -> list[Path]:
    """Every folder under `root` (itself included) that holds an `adapter_config.json`.

    Raises:
        UsageError: `root` is not a directory.

    Example:
        >>> find_adapters("runs/sweep")  # doctest: +SKIP
        [PosixPath('runs/sweep/r4/peft'), PosixPath('runs/sweep/r8/peft')]
    """
    base = Path(root)
    if not base.is_dir():
        raise UsageError(f"{base}: not a directory (pass the folder to search for adapters)")
    found = {p.parent for p in base.rglob(CONFIG_NAME) if p.is_file()}
    return sorted(found, key=lambda p: natural_key(str(p)))


def audit_one(path: str | Path, **options: Any) -> AdapterResult:
    """`audit(path, **options)` as a result: errors are caught and kept as one line.

    Why catch every exception: in a batch, one adapter that trips an unexpected bug must
    not lose the results of the others; the error names its type so it can be reported.
    """
    try:
        return AdapterResult(str(path), True, report=audit(path, **options))
    except GradienceError as exc:
        return AdapterResult(str(path), False, error=str(exc))
    except Exception as exc:  # see the docstring
        return AdapterResult(str(path), False, error=f"{type(exc).__name__}: {exc}".splitlines()[0])


def audit_many(
    root: str | os.PathLike[str],
    *,
    workers: int | None = None,
    executor: concurrent.futures.Executor | None = None,
    scheduler: str | None = None,
    on_result: Callable[[int, int, AdapterResult], None] | None = None,
    **options: Any,
) -> Iterator[AdapterResult]:
    """Audit every adapter under `root`; yield one `AdapterResult` per folder, in path order.

    Args:
        root: folder searched recursively for `adapter_config.json`.
        workers: worker processes (default `default_workers()`); 1 audits in this process.
            At most one of `workers`, `executor` and `scheduler` may be given.
        executor: run the audits here instead (the caller owns it and shuts it down), e.g.
            a Dask client's `get_executor()`; its workers must see `root` under the same path.
        scheduler: a Dask scheduler address (`tcp://HOST:PORT`): run on its workers, connected
            for the duration of the iteration (`gradience.mechanic.cluster.dask_executor`).
        on_result: called as `on_result(k, n, result)` after the k-th of n results, for progress.
        **options: passed to `audit` (`energy`, `top_least_used`, `grid`).

    Raises:
        UsageError: `root` is not a directory, holds no adapter, `workers` < 1, or more than
            one of `workers`, `executor`, `scheduler`.
        ClusterError, MissingDependencyError: `scheduler` unreachable, or dask not installed
            (raised when iteration starts).

    Example:
        >>> for result in audit_many("runs/sweep", workers=4):  # doctest: +SKIP
        ...     print(result.path, result.report.summary.utilization_mean if result.ok else result.error)
    """
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    chosen = [name for name, v in (("--workers", workers), ("executor", executor), ("--scheduler", scheduler))
              if v is not None]  # fmt: skip
    if len(chosen) > 1:  # each names where the audits run: taking one silently would surprise
        raise UsageError(f"{' and '.join(chosen)} each choose where the audits run; give one of them")
    paths = find_adapters(root)
    if not paths:
        raise UsageError(f"{root}: no {CONFIG_NAME} found in it or below it")
    if scheduler is not None:
        return _on_scheduler(paths, scheduler, on_result, options)
    if executor is not None:
        return _on_executor(paths, executor, on_result, options)
    n_workers = min(workers or default_workers(), len(paths))
    return _run(paths, n_workers, on_result, options)


def _on_scheduler(
    paths: list[Path], address: str,
    on_result: Callable[[int, int, AdapterResult], None] | None, options: dict[str, Any],
) -> Iterator[AdapterResult]:
    from gradience.mechanic.cluster import dask_executor

    with dask_executor(address) as pool:
        yield from _on_executor(paths, pool, on_result, options)


def _on_executor(
    paths: list[Path], executor: concurrent.futures.Executor,
    on_result: Callable[[int, int, AdapterResult], None] | None, options: dict[str, Any],
) -> Iterator[AdapterResult]:
    job = partial(audit_one, **options)
    futures = [executor.submit(job, str(path)) for path in paths]
    yield from _report_progress(_results(paths, futures), len(paths), on_result)


def _run(
    paths: list[Path], workers: int, on_result: Callable[[int, int, AdapterResult], None] | None,
    options: dict[str, Any],
) -> Iterator[AdapterResult]:
    job = partial(audit_one, **options)
    if workers == 1:
        yield from _report_progress(map(job, paths), len(paths), on_result)
        return
    # spawn, not fork: a fresh interpreter reads the BLAS variables before numpy loads, and
    # forking a process that may hold threads is unsafe.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        with _single_threaded_blas():  # workers start (and copy the environment) at submit
            futures = [pool.submit(job, path) for path in paths]
        yield from _report_progress(_results(paths, futures), len(paths), on_result)


def _results(
    paths: list[Path], futures: list[concurrent.futures.Future[AdapterResult]]
) -> Iterator[AdapterResult]:
    for path, future in zip(paths, futures, strict=True):
        try:
            yield future.result()
        except BrokenProcessPool as exc:  # a worker killed (out of memory, a signal)
            yield AdapterResult(str(path), False, error=f"worker process died ({exc})")
        except Exception as exc:  # another executor's failure (a lost cluster worker): this path only
            yield AdapterResult(str(path), False, error=f"worker failed ({type(exc).__name__}: {exc})".splitlines()[0])


def _report_progress(
    results: Iterator[AdapterResult], n: int, on_result: Callable[[int, int, AdapterResult], None] | None
) -> Iterator[AdapterResult]:
    for k, result in enumerate(results, 1):
        if on_result is not None:
            on_result(k, n, result)
        yield result


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Set the BLAS thread variables to 1 while workers start; a user's own setting wins."""
    added = [var for var in _BLAS_VARS if var not in os.environ]
    for var in added:
        os.environ[var] = "1"
    try:
        yield
    finally:
        for var in added:
            os.environ.pop(var, None)
