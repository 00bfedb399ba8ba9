"""Adapters per second of the batch audit: in this process, a local pool, and a Dask cluster.

Writes a folder of generated adapters (default 200; tests/factories.py builds them: 8 modules
of 1024×1024 at r=16, float32, each with a known spectrum), then audits the whole folder

- with `workers=1` (this process),
- with `workers=2` (the local process pool of `audit --recursive --workers 2`),
- on a real Dask `LocalCluster` (scheduler + 2 worker processes, one thread each) through
  `Client.get_executor()`, the path `audit --recursive DIR --scheduler tcp://HOST:PORT` takes,

checks that the three runs give identical results, and prints adapters per second with the
machine's load beside each figure. On a shared machine the figures move with the load.

Usage: python benchmarks/fleet_audit.py [--adapters 200] [--repeats 3]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.factories

OUT = Path(__file__).resolve().parent / "out" / "fleet"
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]


def write_fleet(root: Path, n: int) -> Path:
    from tests.factories import AdapterSpec, ModuleSpec, write_adapter

    if len(list(root.glob("*/adapter_config.json"))) == n:
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        sigma = sorted(rng.uniform(0.01, 3.0, 12), reverse=True)
        spec = AdapterSpec({m: ModuleSpec(1024, 1024, sigma) for m in MODULES}, r=16, lora_alpha=32.0)
        write_adapter(root / f"adapter{i:04d}", spec, dtype=np.float32, seed=i)
    return root


def rate(run: Callable[[], list[dict[str, object]]], n: int, repeats: int) -> tuple[float, list[dict[str, object]]]:
    """Median adapters per second over `repeats` runs, and the last run's results."""
    times, results = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = run()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    from gradience.mechanic.audit_many import audit_many

    root = write_fleet(OUT / str(args.adapters), args.adapters)
    n = args.adapters

    def local(workers: int) -> Callable[[], list[dict[str, object]]]:
        return lambda: [r.to_dict(True) for r in audit_many(root, workers=workers)]

    print(f"{n} adapters of {len(MODULES)} modules (1024x1024, r=16, float32) in {root}; {os.cpu_count()} CPUs")
    one, ref = rate(local(1), n, args.repeats)
    print(f"workers=1 (this process): {one:.1f} adapters/s   [load {os.getloadavg()[0]:.2f}]")
    two, res2 = rate(local(2), n, args.repeats)
    print(f"workers=2 (local process pool): {two:.1f} adapters/s   [load {os.getloadavg()[0]:.2f}]")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:  # fmt: skip
        pool = client.get_executor()
        cl, res_cl = rate(lambda: [r.to_dict(True) for r in audit_many(root, executor=pool)], n, args.repeats)
        print(f"Dask LocalCluster (2 worker processes, {cluster.scheduler_address}): {cl:.1f} adapters/s"
              f"   [load {os.getloadavg()[0]:.2f}]")
    same = res2 == ref and res_cl == ref
    print(f"results identical across the three runs: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
