"""How fast is `gradience audit` on a Mistral-7B-shaped adapter, and what does it cost?

Writes a bf16 adapter shaped like Mistral-7B's attention LoRA (32 layers; q/o 4096×4096,
k/v 1024 out × 4096 in; r=32), then measures in one run, side by side:

- whole-process `gradience audit --json` wall time and peak RSS (a fresh interpreter);
- the time to merely read the file's bytes (the floor any audit pays);
- the in-process audit time, and its ratio to the read time;
- a dense baseline: forming ΔW and taking its full SVD, timed on a few modules and
  extrapolated to all of them;
- whether `import gradience` or the audit path imports torch;
- with `--anchor PATH` (another `gradience` console script, e.g. gradience 0.11.0 in a
  throwaway venv: `python3 -m venv /tmp/anchor && /tmp/anchor/bin/pip install gradience==0.11.0`),
  the same whole-process audit by that script, runs interleaved with ours, and the ratio.

Every figure carries the machine's load (os.getloadavg, 1 min) when it was taken: on a shared
machine the medians move with it.

Usage: python benchmarks/audit_speed.py [--layers 32] [--rank 32] [--repeats 3] [--anchor PATH]
       [--dense-modules 2]   (0 skips the slow dense baseline)
"""

from __future__ import annotations

import os

# Same BLAS setting as the `gradience` CLI, so in-process figures compare like for like.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from _process import Measured, compile_bytecode, gradience_exe, load, spawn

OUT = Path(__file__).resolve().parent / "out" / "mistral7b_r32"
SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096)}


def write_adapter(directory: Path, layers: int, rank: int) -> Path:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    decay = np.exp(-np.arange(rank) / 4.0)  # a realistic, fast-decaying spectrum
    tensors = {}
    for layer in range(layers):
        for proj, (out_f, in_f) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            a = rng.standard_normal((rank, in_f), dtype=np.float32) * 0.01
            b = rng.standard_normal((out_f, rank), dtype=np.float32) * decay * 0.01
            tensors[f"{key}.lora_A.weight"] = a.astype(ml_dtypes.bfloat16)
            tensors[f"{key}.lora_B.weight"] = b.astype(ml_dtypes.bfloat16)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(SHAPES),
              "base_model_name_or_path": "mistralai/Mistral-7B-v0.1"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def whole_process(directory: Path, exe: str | None = None) -> Measured:
    """One `gradience audit --json` process (`exe`: another console script, such as an older
    release's). CPU time is the figure a loaded machine disturbs least: wall time also counts
    waiting for a core."""
    env = dict(os.environ)
    if exe:
        env.pop("PYTHONPATH", None)  # our sources on the path would shadow the other release's
    return spawn([exe or gradience_exe(), "audit", "--peft-dir", str(directory), "--json"], env)


def read_bytes(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass
    return time.perf_counter() - t0


def in_process_audit(directory: Path) -> float:
    from gradience.mechanic.audit import audit

    t0 = time.perf_counter()
    audit(directory)
    return time.perf_counter() - t0


def dense_baseline(directory: Path, n_modules: int = 2) -> tuple[float, int]:
    """Seconds per module for form-ΔW-then-full-SVD, on the first modules."""
    from gradience.lora.reader import Adapter

    mods = []
    for m in Adapter.open(directory).modules():  # one k_proj (1024×4096), one q_proj (4096×4096)
        mods.append(m)
        if len(mods) == n_modules:
            break
    t0 = time.perf_counter()
    for m in mods:
        dw = m.scale * (m.lora_B.astype(np.float64) @ m.lora_A.astype(np.float64))  # type: ignore[union-attr]
        np.linalg.svd(dw, compute_uv=False)
    return (time.perf_counter() - t0) / len(mods), len(mods)


def imports_torch(code: str) -> bool:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True)
    return any(line.rstrip().endswith((" torch", "| torch")) for line in out.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--anchor", help="another `gradience` console script to time side by side")
    parser.add_argument("--dense-modules", type=int, default=2, help="modules for the dense baseline (0: skip)")
    args = parser.parse_args()

    directory = write_adapter(OUT, args.layers, args.rank)
    weights = directory / "adapter_model.safetensors"
    size_mib = weights.stat().st_size / 2**20
    n_modules = args.layers * len(SHAPES)
    read_bytes(weights)  # warm the page cache so every figure below reads from memory
    print(compile_bytecode())

    print(f"adapter: {n_modules} modules, r={args.rank}, bf16, {size_mib:.1f} MiB ({weights})")
    procs, anchor = [], []
    load_before = load()
    for _ in range(args.repeats):  # interleaved, so both see the same load
        procs.append(whole_process(directory))
        if args.anchor:
            anchor.append(whole_process(directory, args.anchor))
    wall = statistics.median(p.wall for p in procs)
    cpu = statistics.median(p.cpu for p in procs)
    rss = max(p.rss_mib for p in procs)
    print(f"whole process `gradience audit --json`: {wall:.3f} s wall (median of {args.repeats}; runs:"
          f" {', '.join(f'{p.wall:.3f}' for p in procs)})   target < 0.5 s   [{load_before} -> {load()}]")
    print(f"  CPU time of that process (user + sys): {cpu:.3f} s (median)")
    if anchor:
        anchor_wall = statistics.median(p.wall for p in anchor)
        anchor_cpu = statistics.median(p.cpu for p in anchor)
        print(f"anchor `{args.anchor} audit --json`: {anchor_wall:.3f} s wall (median of {args.repeats}; runs:"
              f" {', '.join(f'{p.wall:.3f}' for p in anchor)}), {anchor_cpu:.3f} s CPU,"
              f" peak RSS {max(p.rss_mib for p in anchor):.1f} MiB")
        print(f"ratio anchor / ours, same run: {anchor_wall / wall:.2f}x wall, {anchor_cpu / cpu:.2f}x CPU"
              f"   target >= 6x   [{load()}]")
    print(f"peak RSS of that process: {rss:.1f} MiB = {rss / size_mib:.2f}x file size   target < 1.5x")
    read = statistics.median(read_bytes(weights) for _ in range(args.repeats))
    print(f"read the file's bytes: {read * 1000:.1f} ms   [{load()}]")
    inproc = statistics.median(in_process_audit(directory) for _ in range(args.repeats))
    print(f"in-process audit (read + core + report): {inproc * 1000:.1f} ms = {inproc / read:.1f}x read time"
          f"   target < 2x   [{load()}]")
    if args.dense_modules > 0:
        dense_per_module, n_dense = dense_baseline(directory, args.dense_modules)
        print(f"dense baseline (form dW, full SVD): {dense_per_module:.3f} s/module on {n_dense} modules"
              f" -> ~{dense_per_module * n_modules:.0f} s for all {n_modules}; the factored audit is"
              f" {dense_per_module * n_modules / inproc:.0f}x faster   [{load()}]")
    torch_on_import = imports_torch("import gradience")
    torch_on_audit = imports_torch(f"from gradience.mechanic.audit import audit; audit({str(directory)!r})")
    print(f"torch imported by `import gradience`: {torch_on_import}; by the audit path: {torch_on_audit}")


if __name__ == "__main__":
    main()
