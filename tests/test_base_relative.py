"""Base-relative update size: power iteration, key mapping, sharded base dirs, the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from gradience.lora.writer import write_safetensors
from gradience.mechanic import base_relative
from gradience.mechanic.audit import audit
from gradience.mechanic.base_relative import (
    POWER_TOL,
    BaseWeights,
    base_weight_key,
    frobenius_norm,
    power_sigma_max,
    relative_sizes,
)
from tests.factories import AdapterSpec, ModuleSpec, orthonormal, write_adapter

GRADIENCE = str(Path(sys.executable).parent / "gradience")
LLAMA_SIGMAS = {  # singular values of each base weight W = U diag(s) Vᵀ
    "model.layers.0.self_attn.q_proj.weight": [40.0, 25.0, 10.0, 1.0],
    "model.layers.0.mlp.down_proj.weight": [9.0, 8.0, 2.0],
    "model.layers.1.self_attn.q_proj.weight": [20.0, 19.0, 3.0],
    "model.layers.1.mlp.down_proj.weight": [5.0, 1.0],
}
LLAMA_SHAPES = {"q_proj": (32, 32), "down_proj": (32, 64)}  # (out, in) as nn.Linear stores it
UPDATE_SIGMAS = {"q_proj": [2.0, 1.0, 0.5], "down_proj": [0.3]}


def known_matrix(shape: tuple[int, int], sigma: list[float], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = min(shape)
    s = np.zeros(k)
    s[: len(sigma)] = sigma
    return (orthonormal(rng, shape[0], k) * s) @ orthonormal(rng, shape[1], k).T


def exact_norms(w: np.ndarray) -> tuple[float, float]:
    w64 = np.asarray(w, dtype=np.float64)
    return float(np.linalg.svd(w64, compute_uv=False)[0]), float(np.linalg.norm(w64))


def write_llama_base(directory: Path, bf16_layer: int | None = 1) -> dict[str, np.ndarray]:
    """Two shards and a model.safetensors.index.json, one layer per shard, plus an embedding."""
    directory.mkdir(parents=True, exist_ok=True)
    weights: dict[str, np.ndarray] = {}
    weight_map: dict[str, str] = {}
    for i, (key, sig) in enumerate(LLAMA_SIGMAS.items()):
        layer = int(key.split(".")[2])
        w = known_matrix(LLAMA_SHAPES[key.split(".")[-2]], sig, seed=10 + i)
        w = w.astype(ml_dtypes.bfloat16 if layer == bf16_layer else np.float32)
        weights[key] = w
        weight_map[key] = f"model-0000{layer + 1}-of-00002.safetensors"
    weights["model.embed_tokens.weight"] = np.ones((10, 32), np.float32)
    weight_map["model.embed_tokens.weight"] = "model-00001-of-00002.safetensors"
    for shard in sorted(set(weight_map.values())):
        write_safetensors(directory / shard, {k: v for k, v in weights.items() if weight_map[k] == shard})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return weights


def llama_adapter(directory: Path) -> Path:
    mods = {
        f"model.layers.{layer}.{part}": ModuleSpec(*LLAMA_SHAPES[part.split(".")[-1]], UPDATE_SIGMAS[part.split(".")[-1]])
        for layer in (0, 1) for part in ("self_attn.q_proj", "mlp.down_proj")
    }
    return write_adapter(directory, AdapterSpec(modules=mods, r=4, lora_alpha=8))


# --- power iteration ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 48), (24, 80), (80, 24)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_power_iteration_matches_numpy_sigma_max(shape: tuple[int, int], dtype: type) -> None:
    for seed, sig in enumerate(([10.0, 7.0, 1.0], [3.0, 2.9, 2.0, 0.1], [1.0])):
        w = known_matrix(shape, sig, seed).astype(dtype)
        sigma, steps, converged = power_sigma_max(w)
        assert converged and steps < 1000
        assert sigma == pytest.approx(exact_norms(w)[0], rel=1e-4)
        assert sigma <= exact_norms(w)[0] * (1 + 1e-6)  # the estimate approaches from below


def test_power_iteration_on_a_dense_random_matrix() -> None:
    w = np.random.default_rng(3).standard_normal((200, 120)).astype(np.float32)
    assert power_sigma_max(w)[0] == pytest.approx(exact_norms(w)[0], rel=1e-4)


def test_power_iteration_zero_matrix_and_cap() -> None:
    assert power_sigma_max(np.zeros((4, 3))) == (0.0, 1, True)
    w = known_matrix((30, 30), [1.0, 0.999, 0.5], seed=1)
    sigma, steps, converged = power_sigma_max(w, max_iter=3)
    assert (steps, converged) == (3, False)
    assert sigma <= 1.0 + 1e-9
    with pytest.raises(ValueError, match="2-D"):
        power_sigma_max(np.zeros(3))


def test_frobenius_norm_in_blocks_is_exact() -> None:
    w = np.random.default_rng(0).standard_normal((2500, 7)).astype(np.float32)
    assert frobenius_norm(w) == pytest.approx(float(np.linalg.norm(w.astype(np.float64))), rel=1e-12)


# --- key mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "keys", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", {"model.layers.0.self_attn.q_proj.weight"}, "model.layers.0.self_attn.q_proj.weight"),
        ("base_model.model.model.layers.0.mlp.up_proj", {"model.layers.0.mlp.up_proj.weight"}, "model.layers.0.mlp.up_proj.weight"),
        ("transformer.h.0.attn.c_attn", {"h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight"}, "h.0.attn.c_attn.weight"),
        ("transformer.h.0.attn.c_attn", {"transformer.h.0.attn.c_attn.weight"}, "transformer.h.0.attn.c_attn.weight"),
        ("layers.3.self_attn.v_proj", {"model.layers.3.self_attn.v_proj.weight"}, "model.layers.3.self_attn.v_proj.weight"),
        ("model.layers.0.self_attn.q_proj", {"model.layers.1.self_attn.q_proj.weight"}, None),
        ("model.layers.0.self_attn.q_proj", {"q_proj.weight", "self_attn.q_proj.weight"}, None),  # never past the block index
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
         {"text_model.encoder.layers.0.self_attn.q_proj.weight", "self_attn.q_proj.weight"},
         "text_model.encoder.layers.0.self_attn.q_proj.weight"),
        ("lora_unet_mid_block_attentions_0_proj_in", {"up.attentions.0.proj_in.weight"}, None),
    ],
)
def test_base_weight_key(module: str, keys: set[str], expected: str | None) -> None:
    assert base_weight_key(module, keys) == expected


# --- Llama-style sharded base ---------------------------------------------------------------


def test_llama_sharded_base_gives_exact_ratios(tmp_path: Path) -> None:
    weights = write_llama_base(tmp_path / "base")
    cache = tmp_path / "norms.json"
    report = audit(llama_adapter(tmp_path / "peft"), base_model=tmp_path / "base", base_cache=cache)
    rows = {m.name: m for m in report.modules}
    for key, w in weights.items():
        if "embed" in key:
            continue
        module = key.removesuffix(".weight")
        s_w, f_w = exact_norms(w)  # of the stored (bf16-rounded) matrix
        sig = UPDATE_SIGMAS[module.split(".")[-1]]
        assert rows[module].rel_spectral == pytest.approx(sig[0] / s_w, rel=1e-4), module
        assert rows[module].rel_frobenius == pytest.approx(float(np.linalg.norm(sig)) / f_w, rel=1e-6), module
    b = report.base_relative
    assert b is not None
    assert (b.n_matched, b.n_unmatched, b.unconverged) == (4, 0, ())
    assert b.cache_path == str(cache) and b.power_tol == POWER_TOL
    rels = sorted(m.rel_spectral for m in report.modules if m.rel_spectral is not None)
    assert b.rel_spectral_max == rels[-1] and b.rel_spectral_median == pytest.approx(np.median(rels))
    assert b.largest[0]["rel_spectral"] == rels[-1]
    d = report.to_dict()
    assert {"rel_spectral", "rel_frobenius"} <= set(d["modules"][0]) and d["base_relative"]["n_matched"] == 4
    json.dumps(d, allow_nan=False)


def test_updates_larger_than_their_base_weight_are_flagged(tmp_path: Path) -> None:
    weights = write_llama_base(tmp_path / "base")
    s_w = exact_norms(weights["model.layers.0.self_attn.q_proj.weight"])[0]
    mods = {
        "model.layers.0.self_attn.q_proj": ModuleSpec(*LLAMA_SHAPES["q_proj"], [2.0 * s_w, 0.1]),  # |dW|_2 = 2 |W|_2
        "model.layers.1.mlp.down_proj": ModuleSpec(*LLAMA_SHAPES["down_proj"], [0.5]),
    }
    peft = write_adapter(tmp_path / "peft", AdapterSpec(modules=mods, r=4, lora_alpha=8))
    report = audit(peft, base_model=tmp_path / "base", base_cache=tmp_path / "c.json")
    flagged = [w for w in report.warnings if "larger than their base weight" in w]
    assert len(flagged) == 1 and flagged[0].endswith(": model.layers.0.self_attn.q_proj")
    row = next(m for m in report.least_rank_used if m.name == "model.layers.0.self_attn.q_proj")
    assert row.rel_spectral == pytest.approx(2.0, rel=1e-4)  # shown beside utilization in the list


def test_without_base_model_the_json_has_no_base_keys(tmp_path: Path) -> None:
    d = audit(llama_adapter(tmp_path / "peft")).to_dict()
    assert "base_relative" not in d
    assert all("rel_spectral" not in row and "rel_frobenius" not in row for row in d["modules"] + d["least_rank_used"])


def test_single_file_base_without_index(tmp_path: Path) -> None:
    weights = write_llama_base(tmp_path / "shards", bf16_layer=None)
    write_safetensors(tmp_path / "model.safetensors", weights)
    report = audit(llama_adapter(tmp_path / "peft"), base_model=tmp_path / "model.safetensors",
                   base_cache=tmp_path / "c.json")
    assert report.base_relative is not None and report.base_relative.n_matched == 4
    (tmp_path / "shards" / "model.safetensors.index.json").unlink()  # the folder's headers are the index
    report = audit(llama_adapter(tmp_path / "peft"), base_model=tmp_path / "shards", base_cache=tmp_path / "d.json")
    assert report.base_relative is not None and report.base_relative.n_matched == 4


# --- GPT-2 Conv1D (fan_in_fan_out) ----------------------------------------------------------


def test_gpt2_conv1d_base_stored_in_out(tmp_path: Path) -> None:
    # GPT-2's checkpoint has no `transformer.` prefix and stores Conv1D weights as (in, out).
    w_attn = known_matrix((16, 48), [6.0, 2.0], seed=5)
    w_proj = known_matrix((16, 16), [3.0, 1.0], seed=6)
    base = tmp_path / "gpt2"
    base.mkdir()
    write_safetensors(base / "model.safetensors", {
        "h.0.attn.c_attn.weight": w_attn.astype(np.float32), "h.0.attn.c_proj.weight": w_proj.astype(np.float32),
        "h.0.attn.c_attn.bias": np.zeros(48, np.float32), "wte.weight": np.ones((50, 16), np.float32),
    })
    spec = AdapterSpec(
        modules={
            "transformer.h.0.attn.c_attn": ModuleSpec(48, 16, [1.5, 0.5]),  # ΔW is (out, in)
            "transformer.h.0.attn.c_proj": ModuleSpec(16, 16, [0.3]),
            "transformer.h.0.mlp.c_fc": ModuleSpec(64, 16, [0.1]),  # not in the base checkpoint
        },
        r=2, lora_alpha=4, extra_config={"fan_in_fan_out": True},
    )
    report = audit(write_adapter(tmp_path / "peft", spec), base_model=base, base_cache=tmp_path / "c.json")
    rows = {m.name: m for m in report.modules}
    assert rows["transformer.h.0.attn.c_attn"].rel_spectral == pytest.approx(1.5 / exact_norms(w_attn)[0], rel=1e-4)
    assert rows["transformer.h.0.attn.c_attn"].rel_frobenius == pytest.approx(
        float(np.hypot(1.5, 0.5)) / exact_norms(w_attn)[1], rel=1e-6)
    assert rows["transformer.h.0.attn.c_proj"].rel_spectral == pytest.approx(0.1, rel=1e-4)
    assert rows["transformer.h.0.mlp.c_fc"].rel_spectral is None
    b = report.base_relative
    assert b is not None and (b.n_matched, b.n_unmatched) == (2, 1)
    assert b.unmatched[0]["module"] == "transformer.h.0.mlp.c_fc"


def test_shape_mismatch_is_unmatched_not_an_error(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    write_safetensors(base / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight": np.ones((8, 8), np.float32)})
    spec = AdapterSpec(modules={"model.layers.0.self_attn.q_proj": ModuleSpec(32, 32, [1.0])}, r=2, lora_alpha=2)
    report = audit(write_adapter(tmp_path / "peft", spec), base_model=base, base_cache=tmp_path / "c.json")
    assert report.base_relative is not None
    assert "shape [8, 8]" in report.base_relative.unmatched[0]["reason"]


# --- the cache ------------------------------------------------------------------------------


def test_second_audit_reads_the_cache_and_a_changed_shard_invalidates_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_llama_base(tmp_path / "base")
    monkeypatch.setenv("GRADIENCE_CACHE_DIR", str(tmp_path / "cache"))
    peft = llama_adapter(tmp_path / "peft")
    first = audit(peft, base_model=tmp_path / "base")
    assert first.base_relative is not None and first.base_relative.cache_path is not None
    cache = Path(first.base_relative.cache_path)
    assert cache.parent == tmp_path / "cache" / "base_norms"
    data = json.loads(cache.read_text())
    assert data["schema"] == "gradience.base_norms/1" and len(data["weights"]) == 4
    assert not list(cache.parent.glob(".*.tmp"))  # written atomically: no temp file left

    def boom(self: BaseWeights, key: str) -> None:
        raise AssertionError(f"recomputed {key}")

    with monkeypatch.context() as m:
        m.setattr(BaseWeights, "norms", boom)
        second = audit(peft, base_model=tmp_path / "base")
    assert second.to_dict() == first.to_dict()

    shard = tmp_path / "base" / "model-00002-of-00002.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    calls: list[str] = []
    real = BaseWeights.norms

    def counting(self: BaseWeights, key: str) -> base_relative.WeightNorms:
        calls.append(key)
        return real(self, key)

    monkeypatch.setattr(BaseWeights, "norms", counting)
    third = audit(peft, base_model=tmp_path / "base")
    assert len(calls) == 4  # a new fingerprint: everything recomputed
    assert third.base_relative is not None and third.base_relative.cache_path != str(cache)


def test_corrupt_or_unwritable_cache_is_a_warning_not_an_error(tmp_path: Path) -> None:
    write_llama_base(tmp_path / "base")
    peft = llama_adapter(tmp_path / "peft")
    cache = tmp_path / "norms.json"
    cache.write_text("{not json")
    report = audit(peft, base_model=tmp_path / "base", base_cache=cache)
    assert report.base_relative is not None and report.base_relative.n_matched == 4
    assert json.loads(cache.read_text())["schema"] == "gradience.base_norms/1"  # replaced
    blocker = tmp_path / "file"
    blocker.write_text("")
    report = audit(peft, base_model=tmp_path / "base", base_cache=blocker / "norms.json")
    assert report.base_relative is not None and report.base_relative.n_matched == 4
    assert any("could not write the base-norm cache" in w for w in report.warnings)


def test_relative_sizes_without_cache(tmp_path: Path) -> None:
    write_llama_base(tmp_path / "base")
    rows = audit(llama_adapter(tmp_path / "peft")).modules
    rel = relative_sizes(rows, tmp_path / "base", use_cache=False)
    assert rel.summary.cache_path is None and len(rel.modules) == 4


# --- CLI ------------------------------------------------------------------------------------


def gradience(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRADIENCE, *args], capture_output=True, text=True, timeout=120, check=False)


def test_cli_base_model_json_text_and_errors(tmp_path: Path) -> None:
    write_llama_base(tmp_path / "base")
    peft = str(llama_adapter(tmp_path / "peft"))
    common = ("audit", "--peft-dir", peft, "--base-model", str(tmp_path / "base"), "--base-cache", str(tmp_path / "c.json"))
    proc = gradience(*common, "--json", "--layers")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    expected = audit(peft, base_model=tmp_path / "base", base_cache=tmp_path / "c.json").to_dict()
    assert got == json.loads(json.dumps(expected))
    assert all(row["rel_spectral"] > 0 for row in got["modules"])
    text = gradience(*common, "--layers")
    assert text.returncode == 0, text.stderr
    assert "Update size relative to the base weight (4 modules matched" in text.stdout
    assert "|dW|_2/|W|_2 median" in text.stdout and " rel2=" in text.stdout
    missing = gradience("audit", "--peft-dir", peft, "--base-model", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("Error: ") and len(missing.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    proc = gradience("audit", "--peft-dir", peft, "--base-model", str(empty))
    assert proc.returncode == 2 and "safetensors" in proc.stderr
