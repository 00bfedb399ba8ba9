"""The batch audit on a cluster a user already runs: a Dask distributed scheduler.

`audit_many` takes any `concurrent.futures.Executor`; `dask_executor(address)` connects to a
scheduler (`tcp://HOST:PORT`) and yields `Client.get_executor()`, so the same per-adapter
jobs run on the cluster's workers. Workers open the adapter folders by path: the folders
must be visible to every worker under the same path (a shared or network filesystem), and
the workers need gradience installed (`pip install gradience[dask]`).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager

from gradience.errors import ClusterError, MissingDependencyError

CONNECT_TIMEOUT_S = 10.0


@contextmanager
def dask_executor(address: str, timeout: float = CONNECT_TIMEOUT_S) -> Iterator[Executor]:
    """A `concurrent.futures.Executor` backed by the Dask scheduler at `address`.

    Args:
        address: the scheduler, e.g. `tcp://10.0.0.5:8786` (what `dask scheduler` prints).
        timeout: seconds to wait for the connection.

    Raises:
        MissingDependencyError: dask.distributed is not installed (extra `[dask]`).
        ClusterError: the scheduler cannot be reached.

    Example:
        >>> with dask_executor("tcp://10.0.0.5:8786") as pool:  # doctest: +SKIP
        ...     results = list(audit_many("/shared/adapters", executor=pool))
    """
    try:
        from distributed import Client
    except ImportError as exc:
        raise MissingDependencyError(
            "dask.distributed is not installed; install it with `pip install gradience[dask]`"
        ) from exc
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address} ({exc}); "
                           "start one with `dask scheduler` or check the address") from exc
    try:
        yield client.get_executor()
    finally:
        client.close()
