"""How fast is `gradience compress` on a Mistral-7B-shaped adapter, against dense per-module SVD?

Writes a bf16 all-linear LoRA adapter shaped like Mistral-7B (32 layers; q/o 4096×4096,
k/v 1024 out × 4096 in, gate/up 14336×4096, down 4096×14336; r=64) into a temp dir, then
measures in one run, side by side:

- whole-process `gradience compress --energy 0.9 --json`: wall time and peak RSS (a fresh
  interpreter; the QR-core path, which never forms ΔW);
- the dense path a script would take: per module, form ΔW = s·B·A (float32), full
  `numpy.linalg.svd`, keep the energy-0.9 rank, re-factor. Timed in its own process on one
  module of each cost class (k_proj 1024×4096, q_proj 4096×4096, gate_proj 14336×4096) and
  extrapolated to all modules (v as k, o as q, up and down as gate: the SVD of 4096×14336
  costs what the one of 14336×4096 does). Its peak RSS is that of the measuring process,
  which holds one module at a time, as a full dense run would.

Both sides use 1 BLAS thread (the `gradience` CLI's setting). Ratios are from one run.

Usage: python benchmarks/compress_speed.py [--layers 32] [--rank 64] [--energy 0.9]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from _process import spawn as spawn_measured
from audit_speed import read_bytes

from gradience.lora.writer import write_safetensors

SHAPES = {  # (out, in)
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}
# Each module's dense cost is taken from the measured module of its class.
COST_CLASS = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.q_proj",
              "self_attn.k_proj": "self_attn.k_proj", "self_attn.v_proj": "self_attn.k_proj",
              "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.gate_proj"}
PREFIX = "base_model.model.model.layers"


def adapter_bytes(layers: int, rank: int) -> int:
    return 2 * layers * rank * sum(o + i for o, i in SHAPES.values())  # bf16


def write_adapter(directory: Path, layers: int, rank: int) -> Path:
    """bf16 factors with a fast-decaying spectrum (the audit benchmark's recipe), all seven projections."""
    rng = np.random.default_rng(0)
    decay = np.exp(-np.arange(rank) / 4.0)
    tensors = {}
    for layer in range(layers):
        for proj, (out_f, in_f) in SHAPES.items():
            key = f"{PREFIX}.{layer}.{proj}"
            a = rng.standard_normal((rank, in_f), dtype=np.float32) * 0.01
            b = rng.standard_normal((out_f, rank), dtype=np.float32) * decay * 0.01
            tensors[f"{key}.lora_A.weight"] = a.astype(ml_dtypes.bfloat16)
            tensors[f"{key}.lora_B.weight"] = b.astype(ml_dtypes.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "adapter_model.safetensors", tensors)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": [p.split(".")[-1] for p in SHAPES], "base_model_name_or_path": "mistralai/Mistral-7B-v0.1"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def spawn(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one fresh process running `args`."""
    run = spawn_measured(args)
    return run.wall, run.rss_mib


def dense_child(directory: Path, energy: float, result: Path) -> None:
    """Form ΔW, full SVD, truncate and re-factor, on layer 0's k_proj, q_proj and gate_proj."""
    from gradience.lora.reader import Adapter

    adapter = Adapter.open(directory)
    wanted = {f"model.layers.0.{c}" for c in set(COST_CLASS.values())}
    times, ranks = {}, {}
    for m in adapter.modules():
        if m.name not in wanted:
            continue
        t0 = time.perf_counter()
        a, b = m.lora_A.astype(np.float32), m.lora_B.astype(np.float32)  # type: ignore[union-attr]
        dw = np.float32(m.scale) * (b @ a)
        u, s, vt = np.linalg.svd(dw, full_matrices=False)
        cum = np.cumsum(s.astype(np.float64) ** 2)
        k = int(np.searchsorted(cum, energy * cum[-1]) + 1)
        root = np.sqrt(s[:k])
        new_b, new_a = u[:, :k] * root, root[:, None] * vt[:k]
        del dw, u, vt, new_b, new_a
        times[m.name.split("layers.0.")[1]] = time.perf_counter() - t0
        ranks[m.name] = k
    result.write_text(json.dumps({"times": times, "ranks": ranks}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--energy", type=float, default=0.9)
    parser.add_argument("--dense-child", nargs=2, metavar=("DIR", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dense_child:
        dense_child(Path(args.dense_child[0]), args.energy, Path(args.dense_child[1]))
        return

    need = adapter_bytes(args.layers, args.rank)
    tmp_root = Path(tempfile.gettempdir())
    free = shutil.disk_usage(tmp_root).free
    if 2 * need > free:  # input plus (at most) an equally large output
        raise SystemExit(f"{need / 2**20:.0f} MiB adapter does not fit twice in {tmp_root} ({free / 2**20:.0f} MiB free); lower --layers")
    with tempfile.TemporaryDirectory(prefix="compress_speed_") as tmp:
        run(Path(tmp), args)


def run(tmp: Path, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    directory = write_adapter(tmp / "in", args.layers, args.rank)
    write_s = time.perf_counter() - t0
    weights = directory / "adapter_model.safetensors"
    size_mib = weights.stat().st_size / 2**20
    n_modules = args.layers * len(SHAPES)
    read_s = read_bytes(weights)  # also warms the page cache for both sides

    exe = str(Path(sys.executable).parent / "gradience")
    out = tmp / "out"
    g_wall, g_rss = spawn([exe, "compress", "--peft-dir", str(directory), "--out-dir", str(out), "--energy", str(args.energy), "--json"])
    report = json.loads(subprocess.run(
        [exe, "compress", "--peft-dir", str(directory), "--out-dir", str(tmp / "out2"), "--energy", str(args.energy), "--json"],
        capture_output=True, text=True, check=True).stdout)
    g_ranks = {m["name"]: m["r_after"] for m in report["modules"]}

    result = tmp / "dense.json"
    d_wall, d_rss = spawn([sys.executable, str(Path(__file__).resolve()), "--energy", str(args.energy), "--dense-child", str(directory), str(result)])
    dense = json.loads(result.read_text())
    per_class = dense["times"]
    dense_total = args.layers * sum(per_class[COST_CLASS[p]] for p in SHAPES)
    agree = all(g_ranks[name] == k for name, k in dense["ranks"].items())

    print(f"adapter: {n_modules} modules ({args.layers} layers x 7 projections), r={args.rank}, bf16, {size_mib:.1f} MiB"
          f" (written in {write_s:.1f} s; read back in {read_s * 1000:.0f} ms)")
    print(f"gradience compress --energy {args.energy} (whole process): {g_wall:.2f} s wall, peak RSS {g_rss:.0f} MiB"
          f" = {g_rss / size_mib:.2f}x file size")
    print(f"  -> r={report['r']}, LoRA params {report['params_before']:,} -> {report['params_after']:,}"
          f" ({100 * report['param_reduction']:.1f}% fewer), energy kept {100 * report['retained_energy']:.2f}%")
    print("dense per-module SVD (float32 B@A, numpy.linalg.svd full_matrices=False, truncate, re-factor), measured on layer 0:")
    for name, secs in sorted(per_class.items()):
        print(f"  {name:<18} {SHAPES[name][0]}x{SHAPES[name][1]}: {secs:.2f} s")
    print(f"  extrapolated to all {n_modules} modules (v as k, o as q, up/down as gate): ~{dense_total:.0f} s;"
          f" measuring process {d_wall:.1f} s wall, peak RSS {d_rss:.0f} MiB")
    print(f"energy-{args.energy} ranks on the measured modules, dense vs gradience: {'identical' if agree else 'DIFFERENT'}"
          f" {sorted(dense['ranks'].values())}")
    print(f"ratio (one run): dense/gradience wall = {dense_total / g_wall:.0f}x; dense/gradience peak RSS = {d_rss / g_rss:.2f}x")


if __name__ == "__main__":
    main()
