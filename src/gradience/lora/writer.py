"""Writing LoRA adapters: factor layout, scale, pattern keys and atomic safetensors files.

The helpers `compress` and `merge` share to turn re-factored updates into a PEFT adapter
folder that `PeftModel.from_pretrained` loads: PEFT's scale at a new rank, the split of an
SVD between A and B, the stored layout of each layer kind, `rank_pattern` keys that match
exactly one module, and an atomic writer (safetensors with bf16, which safetensors.numpy
cannot write).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from gradience._io import atomic_open, replace_atomic
from gradience.errors import AdapterError, UsageError
from gradience.lora.reader import CONFIG_NAME, WEIGHT_NAMES, Adapter, parse_lora_key, pattern_key
from gradience.lora.safetensors_file import safetensors_dtype_names
from gradience.lora.scale import lora_scale as lora_scale
from gradience.spectrum import core_singular_values

V = TypeVar("V")


def split_factors(
    u: np.ndarray, sigma: np.ndarray, vt: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with scale · B · A = U diag(σ) Vt, √(σ/|scale|) on each side (sign on B)."""
    if scale == 0.0:
        if np.any(sigma > 0):
            raise UsageError("lora_alpha is 0: a nonzero update cannot be written at scale 0")
        return np.zeros_like(vt), np.zeros_like(u)
    root = np.sqrt(sigma / abs(scale))
    return root[:, None] * vt, u * (root * math.copysign(1.0, scale))


def to_stored(
    kind: str, a: np.ndarray, b: np.ndarray, like_a: tuple[int, ...], like_b: tuple[int, ...],
    dtype_a: Any, dtype_b: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """(A: (k, in), B: (out, k)) in the layout PEFT saves for `kind`, cast to the stored dtypes.

    `like_a` / `like_b` are the stored shapes of a module of the same kind (any rank).
    """
    k = a.shape[0]
    if kind == "embedding":  # lora_embedding_A: (k, num_embeddings), lora_embedding_B: (dim, k)
        sa, sb = b.T, a.T
    elif kind == "conv":  # lora_A (k, in, *kernel), lora_B (out, k, *ones)
        sa, sb = a.reshape(k, *like_a[1:]), b.reshape(like_b[0], k, *like_b[2:])
    else:
        sa, sb = a, b
    return np.ascontiguousarray(sa.astype(dtype_a)), np.ascontiguousarray(sb.astype(dtype_b))


def from_stored(kind: str, sa: np.ndarray, sb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `to_stored`, in float64: (A: (k, in), B: (out, k))."""
    a, b = np.asarray(sa, dtype=np.float64), np.asarray(sb, dtype=np.float64)
    if kind == "embedding":
        return b.T, a.T
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def factored_distance(a1: np.ndarray, b1: np.ndarray, a2: np.ndarray, b2: np.ndarray) -> float:
    """‖B₁A₁ − B₂A₂‖_F through the QR core of [B₁ | −B₂] · [A₁; A₂], never out×in.

    Unlike ‖X‖² + ‖Y‖² − 2⟨X, Y⟩ this does not cancel catastrophically when X ≈ Y.
    """
    a = np.concatenate([np.asarray(a1, np.float64), np.asarray(a2, np.float64)], axis=0)
    b = np.concatenate([np.asarray(b1, np.float64), -np.asarray(b2, np.float64)], axis=1)
    return float(np.linalg.norm(core_singular_values(a, b)))


def module_keys(adapter: Adapter) -> dict[str, tuple[str, str]]:
    """Module path -> (stored lora_A key, stored lora_B key), from the one key parser."""
    found: dict[str, dict[str, str]] = {}
    for info in adapter.file:
        parsed = parse_lora_key(info.name)
        if parsed is not None and parsed[1] in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            found.setdefault(parsed[0], {})[parsed[1][-1]] = info.name
    return {m: (d["A"], d["B"]) for m, d in found.items() if "A" in d and "B" in d}


def bias_key(key_b: str) -> str:
    """The stored key of lora_B's bias beside the stored lora_B weight key."""
    return key_b.removesuffix(".weight") + ".bias"


def rescale_bias(
    bias: np.ndarray, scale_before: float, scale_after: float, key: str, tensors: dict[str, np.ndarray]
) -> float:
    """Store b' = scale_before · b / scale_after under `key` (PEFT adds scale · b, so the product is kept).

    Returns ‖scale_after · b' − scale_before · b‖², measured on b' as stored (its dtype).
    """
    exact = scale_before * np.asarray(bias, np.float64)
    stored = (exact / scale_after if scale_after != 0 else np.zeros_like(exact)).astype(bias.dtype)
    tensors[key] = np.ascontiguousarray(stored)
    return float(np.sum(np.square(scale_after * np.asarray(stored, np.float64) - exact)))


def global_rank(ranks: Mapping[str, int]) -> int:
    """The most common rank (the larger on a tie): the `r` that needs the fewest pattern keys."""
    counts = Counter(ranks.values())
    return max(counts, key=lambda k: (counts[k], k))


def exact_pattern_keys(values: Mapping[str, V], modules: Sequence[str]) -> dict[str, V]:
    """rank_pattern / alpha_pattern entries keyed so that each matches exactly its module.

    PEFT treats keys as regexes matched at the end of the module path; a plain path is used
    when it matches only its own module, else its `re.escape`d form, else one anchored with
    `^`. Each key matching one module makes the first-match-wins order irrelevant.
    """
    out: dict[str, V] = {}
    for name, value in values.items():
        for key in (name, re.escape(name), "^" + re.escape(name)):
            hits = [m for m in modules if pattern_key([key], m) is not None]
            if hits == [name]:
                out[key] = value
                break
        else:
            raise AdapterError(f"module {name}: no rank_pattern/alpha_pattern key matches it alone")
    return out


def prepare_out_dir(out_dir: str | Path, inputs: Sequence[str | Path], force: bool) -> Path:
    """Check that `out_dir` may receive an adapter; nothing is written yet."""
    out = Path(out_dir)
    for d in inputs:
        if Path(d).exists() and out.resolve() == Path(d).resolve():
            raise UsageError(f"{out}: is an input adapter directory; choose another --out-dir")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    existing = [n for n in (CONFIG_NAME, *WEIGHT_NAMES) if (out / n).exists()]
    if existing and not force:
        raise UsageError(f"{out}: already holds an adapter ({existing[0]}); pass --force to overwrite it")
    return out


def save_adapter(out: Path, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Write the adapter as one unit: a complete folder beside `out`, then renamed onto it.

    The new weights and config are written into a temp folder in `out`'s parent, with any
    other files already in `out` (a README, a tokenizer) linked or copied in; then `out` is
    renamed aside, the temp folder renamed to `out`, and the old one removed. A crash leaves
    `out` as the complete old adapter or the complete new one (at worst beside the temp
    folder), never new weights beside an old config.
    """
    out = Path(out)
    existing = next(p for p in out.absolute().parents if p.exists())
    if not existing.is_dir():  # mkdir would say "File exists", which misleads
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(existing))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would outlive the rename
        write_safetensors(tmp / WEIGHT_NAMES[0], tensors)
        replace_atomic(tmp / CONFIG_NAME, (json.dumps(dict(config), indent=2) + "\n").encode("utf-8"))
        if out.is_dir():
            _carry_other_files(out, tmp)
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _carry_other_files(src: Path, dst: Path) -> None:
    """Everything in `src` but the adapter's own files (adapter_model.bin is stale: PEFT would ignore it)."""
    for item in src.iterdir():
        if item.name in (CONFIG_NAME, *WEIGHT_NAMES):
            continue
        target = dst / item.name
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, target, symlinks=True)
            continue
        try:
            os.link(item, target, follow_symlinks=False)
        except OSError:
            shutil.copy2(item, target, follow_symlinks=False)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """A safetensors file (bf16 included, which safetensors.numpy cannot write).

    Tensors are laid out by descending item size after an 8-byte-padded header, so every
    tensor starts aligned to its own item size. Each tensor's bytes are written straight
    from its array: no second copy of the file is built in memory.
    """
    names = safetensors_dtype_names()
    arrays = {n: np.ascontiguousarray(t) for n, t in tensors.items()}
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        t = arrays[name]
        if t.dtype not in names:
            raise UsageError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with atomic_open(path) as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for n in order:
            fh.write(arrays[n].reshape(-1).view(np.uint8).data)
