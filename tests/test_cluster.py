"""The batch audit on a real Dask cluster: a `LocalCluster` scheduler with worker processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gradience.errors import ClusterError
from gradience.mechanic.audit_many import AdapterResult, audit_many
from gradience.mechanic.cluster import dask_executor
from tests.factories import AdapterSpec, ModuleSpec, write_adapter

distributed = pytest.importorskip("distributed")

GRADIENCE = str(Path(sys.executable).parent / "gradience")
N_ADAPTERS = 200


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 adapters with different spectra and ranks, and one with its weights cut short."""
    root = tmp_path_factory.mktemp("fleet")
    rng = np.random.default_rng(0)
    for i in range(N_ADAPTERS):
        r = int(rng.choice([4, 8, 16]))
        sigma = sorted(rng.uniform(0.01, 3.0, int(rng.integers(1, r + 1))), reverse=True)
        modules = {
            "model.layers.0.self_attn.q_proj": ModuleSpec(64, 48, sigma),
            "model.layers.0.self_attn.v_proj": ModuleSpec(32, 48, sigma[:2]),
        }
        write_adapter(root / f"team{i % 7}" / f"adapter{i}", AdapterSpec(modules, r=r, lora_alpha=2.0 * r), seed=i)
    weights = root / "team3" / "adapter3" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    return root


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """The real scheduler and two worker processes (one thread each), on this machine."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as c:  # fmt: skip
        yield c


def _dicts(results: Iterator[AdapterResult]) -> list[dict[str, object]]:
    return [r.to_dict(include_modules=True) for r in results]


def test_cluster_results_are_identical_to_the_local_run(fleet: Path, cluster: object) -> None:
    local = _dicts(audit_many(fleet, workers=1))
    assert len(local) == N_ADAPTERS
    assert [d["ok"] for d in local].count(False) == 1  # the truncated one, reported, not fatal
    with distributed.Client(cluster) as client:
        on_cluster = _dicts(audit_many(fleet, executor=client.get_executor()))
        # the work really ran on both worker processes, not in this one
        ran_on = client.run(lambda dask_worker: len(dask_worker.data) + dask_worker.state.executed_count)
    assert on_cluster == local
    assert len(ran_on) == 2 and all(n > 0 for n in ran_on.values())


def test_scheduler_address_connects_for_the_iteration(fleet: Path, cluster: object) -> None:
    address = cluster.scheduler_address  # type: ignore[attr-defined]
    seen: list[tuple[int, int]] = []
    results = _dicts(audit_many(fleet, scheduler=address, on_result=lambda k, n, _: seen.append((k, n))))
    assert results == _dicts(audit_many(fleet, workers=1))
    assert seen[-1] == (N_ADAPTERS, N_ADAPTERS)


def test_cli_scheduler_flag_prints_the_local_lines(fleet: Path, cluster: object) -> None:
    address = cluster.scheduler_address  # type: ignore[attr-defined]
    proc = subprocess.run([GRADIENCE, "audit", "--recursive", str(fleet), "--scheduler", address],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # one adapter is broken
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines == [json.loads(json.dumps(r.to_dict())) for r in audit_many(fleet, workers=1)]
    assert f"[{N_ADAPTERS}/{N_ADAPTERS}]" in proc.stderr


def test_unreachable_scheduler_is_a_cluster_error() -> None:
    address = "tcp://127.0.0.1:9"  # the discard port: nothing listens there
    with pytest.raises(ClusterError, match=re.escape(f"cannot reach the Dask scheduler at {address}")), \
            dask_executor(address, timeout=1.0):  # fmt: skip
        pass
