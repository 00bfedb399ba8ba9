"""`compare` on constructed geometry and `merge` against PEFT's own delta weights."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from gradience.errors import AdapterError, UnsupportedAdapterError, UsageError
from gradience.mechanic.compare import compare
from gradience.mechanic.merge import merge
from tests.factories import PREFIX, AdapterSpec, ModuleSpec, write_adapter

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel  # noqa: E402

from tests.test_adapter import _lora_layers, _save_peft, _tiny_llama  # noqa: E402

GRADIENCE = str(Path(sys.executable).parent / "gradience")
Q = "model.layers.0.self_attn.q_proj"


def _write(directory: Path, modules: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float | None = None) -> Path:
    """An adapter from explicit (A, B) factors; alpha defaults to r, so the scale is 1."""
    directory.mkdir(parents=True)
    r = next(iter(modules.values()))[0].shape[0]
    tensors = {}
    for name, (a, b) in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float64)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float64)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha if alpha is not None else r}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def _e(n: int, *idx: int) -> np.ndarray:
    """Columns e_i of the n×n identity."""
    return np.eye(n)[:, list(idx)]


# --- compare -----------------------------------------------------------------------------------


def _factory(tmp_path: Path, name: str = "a", seed: int = 0, **kw: Any) -> Path:
    mods = {
        Q: ModuleSpec(32, 32, [4.0, 2.0, 1.0]),
        "model.layers.0.mlp.down_proj": ModuleSpec(32, 64, [1.0, 0.5]),
    }
    return write_adapter(tmp_path / name, AdapterSpec(modules=mods, r=4, lora_alpha=8, **kw), seed=seed)


def test_identical_adapters_overlap_and_agree_fully(tmp_path: Path) -> None:
    a = _factory(tmp_path, "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    report = compare(a, b)
    assert report.n_shared == 2 and report.only_a == report.only_b == ()
    for m in report.modules:
        assert m.overlap_left == pytest.approx(1.0) and m.overlap_right == pytest.approx(1.0)
        assert m.agreement == pytest.approx(1.0) and m.magnitude_ratio == pytest.approx(1.0)
    assert {m.name: m.k for m in report.modules} == {Q: 2, "model.layers.0.mlp.down_proj": 2}  # 0.8 < 0.9
    assert report.dominance == 0.0 and report.agreement == pytest.approx(1.0)
    assert report.verdict == "compatible"


def test_orthogonal_subspaces_have_zero_overlap(tmp_path: Path) -> None:
    n = 16
    a = _write(tmp_path / "a", {Q: (_e(n, 0, 1).T, _e(n, 0, 1) * [3.0, 1.0])})
    b = _write(tmp_path / "b", {Q: (_e(n, 2, 3).T, _e(n, 2, 3) * [3.0, 1.0])})
    report = compare(a, b, k=2)
    (m,) = report.modules
    assert m.overlap_left == pytest.approx(0.0, abs=1e-12) and m.overlap_right == pytest.approx(0.0, abs=1e-12)
    assert m.agreement == pytest.approx(0.0, abs=1e-12)
    assert report.verdict == "independent"
    # orthogonal on one side only is enough for zero agreement
    c = _write(tmp_path / "c", {Q: (_e(n, 0, 1).T, _e(n, 2, 3) * [3.0, 1.0])})
    (m,) = compare(a, c, k=2).modules
    assert m.overlap_left == pytest.approx(0.0, abs=1e-12) and m.overlap_right == pytest.approx(1.0)
    assert m.agreement == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("theta", [0.0, 0.3, math.pi / 4, 1.2, math.pi / 2])
def test_a_known_angle_gives_its_cosine(tmp_path: Path, theta: float) -> None:
    n = 8
    u2 = math.cos(theta) * _e(n, 0) + math.sin(theta) * _e(n, 1)
    a = _write(tmp_path / "a", {Q: (_e(n, 0).T, 2.0 * _e(n, 0))})
    b = _write(tmp_path / "b", {Q: (_e(n, 0).T, 2.0 * u2)})
    (m,) = compare(a, b).modules
    assert m.k == 1
    assert m.overlap_left == pytest.approx(math.cos(theta), abs=1e-12)
    assert m.overlap_right == pytest.approx(1.0)
    assert m.agreement == pytest.approx(math.cos(theta), abs=1e-12)


def test_principal_angles_of_two_planes(tmp_path: Path) -> None:
    # span{e0, e1} vs span{e0, cos t e1 + sin t e2}: principal angles 0 and t
    n, t = 8, 0.7
    b2 = np.stack([_e(n, 0)[:, 0], math.cos(t) * _e(n, 1)[:, 0] + math.sin(t) * _e(n, 2)[:, 0]], axis=1)
    a = _write(tmp_path / "a", {Q: (_e(n, 0, 1).T, _e(n, 0, 1))})
    b = _write(tmp_path / "b", {Q: (_e(n, 0, 1).T, b2)})
    (m,) = compare(a, b, k=2).modules
    assert m.overlap_left == pytest.approx((1 + math.cos(t)) / 2, abs=1e-12)


def test_dominance_conflict_and_magnitude(tmp_path: Path) -> None:
    a = _factory(tmp_path, "a")
    for name, factor in (("x2", 2.0), ("x4", 4.0), ("neg", -1.0)):
        d = _factory(tmp_path, name)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["lora_alpha"] = 8 * factor
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    x2, x4, neg = compare(a, tmp_path / "x2"), compare(a, tmp_path / "x4"), compare(a, tmp_path / "neg")
    assert x2.dominance == pytest.approx(1 / 3) and x2.magnitude_ratio == pytest.approx(1 / 2)
    assert x2.verdict == "compatible"
    assert x4.dominance == pytest.approx(0.6) and x4.verdict == "dominated"
    assert "adapter B would dominate" in x4.verdict_reason
    assert neg.agreement == pytest.approx(-1.0) and neg.verdict == "conflicting"
    assert all(m.overlap_left == pytest.approx(1.0) for m in neg.modules)  # subspaces ignore sign


def test_agreement_uses_the_trace_identity_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    mods_a = {Q: (rng.standard_normal((3, 20)), rng.standard_normal((24, 3)))}
    mods_b = {Q: (rng.standard_normal((5, 20)), rng.standard_normal((24, 5)))}
    a, b = _write(tmp_path / "a", mods_a, alpha=6.0), _write(tmp_path / "b", mods_b, alpha=2.0)
    (m,) = compare(a, b).modules
    d1 = 2.0 * mods_a[Q][1] @ mods_a[Q][0]  # scale 6 / 3
    d2 = 0.4 * mods_b[Q][1] @ mods_b[Q][0]  # scale 2 / 5
    cos = float(np.sum(d1 * d2) / (np.linalg.norm(d1) * np.linalg.norm(d2)))
    assert m.agreement == pytest.approx(cos, rel=1e-10)
    assert m.magnitude_ratio == pytest.approx(np.linalg.norm(d1) / np.linalg.norm(d2), rel=1e-10)
    u1 = np.linalg.svd(d1)[0][:, : m.k]
    u2 = np.linalg.svd(d2)[0][:, : m.k]
    dense = np.mean(np.linalg.svd(u1.T @ u2, compute_uv=False))
    assert m.overlap_left == pytest.approx(dense, rel=1e-8)


def test_unshared_modules_are_listed_and_count_in_the_norms(tmp_path: Path) -> None:
    n = 8
    a = _write(tmp_path / "a", {Q: (_e(n, 0).T, _e(n, 0)), "x.k_proj": (_e(n, 0).T, 3.0 * _e(n, 0))})
    b = _write(tmp_path / "b", {Q: (_e(n, 0).T, _e(n, 0)), "x.v_proj": (_e(n, 0).T, _e(n, 0))})
    report = compare(a, b)
    assert report.only_a == ("x.k_proj",) and report.only_b == ("x.v_proj",)
    assert report.frobenius_norm_a == pytest.approx(math.sqrt(10)) and report.frobenius_norm_b == pytest.approx(math.sqrt(2))
    assert report.agreement == pytest.approx(1 / math.sqrt(20))
    wrong = _write(tmp_path / "c", {Q: (np.ones((1, 4)), np.ones((8, 1)))})
    mismatch = compare(a, wrong)
    assert mismatch.modules[0].status == "shape_mismatch" and mismatch.verdict == "disjoint"
    with pytest.raises(UsageError):
        compare(a, b, k=0)


# --- merge against PEFT ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any], dict[str, Any]]:
    root = tmp_path_factory.mktemp("pair")
    ca = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2})
    cb = LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "down_proj"])
    da = _deltas(_save_peft(_tiny_llama(), ca, root / "a", seed=1))
    db = _deltas(_save_peft(_tiny_llama(), cb, root / "b", seed=2))
    return root / "a", root / "b", da, db


def _deltas(peft_model: Any) -> dict[str, np.ndarray]:
    peft_model.double()
    return {n: layer.get_delta_weight("default").detach().numpy() for n, layer in _lora_layers(peft_model).items()}


def _loaded_deltas(directory: Path) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _deltas(PeftModel.from_pretrained(_tiny_llama(), directory))


def _exact(da: dict[str, np.ndarray], db: dict[str, np.ndarray], w: tuple[float, float]) -> dict[str, np.ndarray]:
    names = set(da) | set(db)
    return {n: w[0] * da.get(n, 0.0) + w[1] * db.get(n, 0.0) for n in names}  # type: ignore[misc]


def _rel(got: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> float:
    num = sum(np.linalg.norm(got[n] - exact[n]) ** 2 for n in exact)
    return math.sqrt(num / sum(np.linalg.norm(e) ** 2 for e in exact.values()))


def test_linear_merge_loads_in_peft_and_is_exact(tmp_path: Path, peft_pair: Any) -> None:
    a, b, da, db = peft_pair
    w = (0.7, -1.3)
    report = merge(a, b, tmp_path / "m", weights=w, method="linear")
    got, exact = _loaded_deltas(tmp_path / "m"), _exact(da, db, w)
    assert set(got) == set(exact)
    for name, e in exact.items():
        assert np.linalg.norm(got[name] - e) <= 1e-6 * np.linalg.norm(e), name
    rows = {m.name: m for m in report.modules}
    assert rows[Q].source == "both" and rows[Q].r == 7
    assert rows["model.embed_tokens"].source == "a" and rows["model.layers.0.mlp.down_proj"].source == "b"
    assert report.relative_error < 1e-6
    assert report.relative_error == pytest.approx(_rel(got, exact), rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("method", ["svd", "ties", "dare"])
def test_other_methods_load_and_report_their_true_error(tmp_path: Path, peft_pair: Any, method: str) -> None:
    a, b, da, db = peft_pair
    w = (0.5, 1.0)
    report = merge(a, b, tmp_path / method, weights=w, method=method, seed=3)
    got, exact = _loaded_deltas(tmp_path / method), _exact(da, db, w)
    assert report.relative_error == pytest.approx(_rel(got, exact), rel=1e-4)
    if method == "svd":  # rank max(r1, r2): the truncation of the exact sum, error = the tail
        for name, e in exact.items():
            k = {m.name: m.r for m in report.modules}[name]
            u, s, vt = np.linalg.svd(e)
            assert np.linalg.norm(got[name] - (u[:, :k] * s[:k]) @ vt[:k]) <= 1e-6 * s[0], name
            row = next(m for m in report.modules if m.name == name)
            assert row.relative_error == pytest.approx(np.linalg.norm(s[k:]) / np.linalg.norm(s), rel=1e-4, abs=1e-7)


def test_dare_at_density_one_is_linear_and_seeds_reproduce(tmp_path: Path, peft_pair: Any) -> None:
    a, b, da, db = peft_pair
    merge(a, b, tmp_path / "d1", method="dare", density=1.0)
    assert _rel(_loaded_deltas(tmp_path / "d1"), _exact(da, db, (1.0, 1.0))) < 1e-6
    r1 = merge(a, b, tmp_path / "s1", method="dare", seed=5)
    r2 = merge(a, b, tmp_path / "s2", method="dare", seed=5)
    r3 = merge(a, b, tmp_path / "s3", method="dare", seed=6)
    assert r1.relative_error == r2.relative_error != r3.relative_error
    s1, s2 = (tmp_path / d / "adapter_model.safetensors" for d in ("s1", "s2"))
    assert s1.read_bytes() == s2.read_bytes()


def test_ties_of_an_adapter_with_itself_is_the_adapter(tmp_path: Path, peft_pair: Any) -> None:
    a, _, da, _ = peft_pair
    shutil.copytree(a, tmp_path / "a2")
    # every coordinate agrees in sign, so the disjoint mean of (C + C) is C
    merge(a, tmp_path / "a2", tmp_path / "t", method="ties", density=1.0)
    assert _rel(_loaded_deltas(tmp_path / "t"), da) < 1e-6


def test_ties_trims_conflicting_coordinates(tmp_path: Path) -> None:
    n = 8
    a = _write(tmp_path / "a", {Q: (_e(n, 0, 1).T, _e(n, 0, 1) * [2.0, 1.0])})
    b = _write(tmp_path / "b", {Q: (_e(n, 0, 1).T, _e(n, 0, 1) * [3.0, -1.0])})
    # in the shared basis C_a = diag(2, 1), C_b = diag(3, -1): e0 agrees (mean 2.5), e1 sums
    # to 0 and elects +, so only A's +1 survives
    report = merge(a, b, tmp_path / "t", method="ties", density=1.0)
    assert report.modules[0].r == 2
    expected = np.diag([2.5, 1.0])
    exact = np.diag([5.0, 0.0])
    assert report.relative_error == pytest.approx(np.linalg.norm(expected - exact) / 5.0, rel=1e-9)


def test_merge_refusals(tmp_path: Path, peft_pair: Any) -> None:
    a, b, _, _ = peft_pair
    with pytest.raises(UsageError, match="input adapter"):
        merge(a, b, a)
    merge(a, b, tmp_path / "m")
    with pytest.raises(UsageError, match="--force"):
        merge(a, b, tmp_path / "m")
    merge(a, b, tmp_path / "m", force=True)
    for kw in ({"method": "nope"}, {"rank": 2}, {"weights": (1.0,)}, {"method": "dare", "density": 0.0}):
        with pytest.raises(UsageError):
            merge(a, b, tmp_path / "x", **kw)
    wrong = _write(tmp_path / "w", {Q: (np.ones((1, 4)), np.ones((8, 1)))})
    with pytest.raises(AdapterError, match=Q):
        merge(a, wrong, tmp_path / "x")
    _save_peft(_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), tmp_path / "dora")
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        merge(a, tmp_path / "dora", tmp_path / "x")


# --- the CLIs ------------------------------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRADIENCE, *args], capture_output=True, text=True, timeout=120, check=False)


def test_compare_cli_json_equals_the_report(tmp_path: Path) -> None:
    a, b = _factory(tmp_path, "a", seed=0), _factory(tmp_path, "b", seed=7)
    proc = _run("compare", str(a), str(b), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(json.dumps(compare(a, b).to_dict()))
    text = _run("compare", str(a), str(b), "--k", "1")
    assert text.returncode == 0 and "Verdict:" in text.stdout and Q in text.stdout


def test_merge_cli(tmp_path: Path, peft_pair: Any) -> None:
    a, b, da, db = peft_pair
    out = tmp_path / "m"
    args = ("merge", str(a), str(b), "--weights", "0.5", "2", "--method", "svd", "--rank", "3", "--out-dir", str(out))
    proc = _run(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["method"] == "svd" and got["weights"] == [0.5, 2.0] and got["r"] == 3
    assert got["relative_error"] == pytest.approx(_rel(_loaded_deltas(out), _exact(da, db, (0.5, 2.0))), rel=1e-4)
    again = _run(*args)
    assert again.returncode == 2 and again.stderr.startswith("Error: ") and "--force" in again.stderr
    text = _run(*args, "--force")
    assert text.returncode == 0 and "GRADIENCE LoRA MERGE" in text.stdout
