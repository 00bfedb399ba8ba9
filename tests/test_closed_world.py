"""The edges of the LoRA format (issue 9), each checked against the library that applies it.

Every numbered case of the issue has a test here (case 5 and 7 are CLI tests in
test_cli_audit.py). Adapters are built with PEFT on a tiny torch net, saved, run through our
code, loaded back with `PeftModel.from_pretrained` and compared on the module's output;
kohya files are checked against the update the factors define as kohya/LyCORIS apply them.
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from gradience.errors import AdapterError, UnsupportedAdapterError, UsageError
from gradience.lora.reader import Adapter, LoraModule, LoraSettings
from gradience.lora.safetensors_file import TensorFile
from gradience.mechanic.audit import audit
from gradience.mechanic.compare import compare, random_overlap_sq
from gradience.mechanic.compress import compress
from gradience.mechanic.merge import merge
from tests.factories import AdapterSpec, ModuleSpec, write_adapter

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

F = torch.nn.functional


class Net(torch.nn.Module):  # type: ignore[misc]
    """Three linear layers with biases (lora_bias needs a base bias), LoRA on fc1 and fc2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(16, 24)
        self.fc2 = torch.nn.Linear(24, 24)
        self.head = torch.nn.Linear(24, 4)

    def forward(self, x: Any) -> Any:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _x(n: int) -> Any:
    return torch.randn(5, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)


def _make(directory: Path, seed: int = 1, **config: Any) -> Any:
    """A PEFT adapter on Net with every LoRA tensor random (B and the bias too), saved to `directory`."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["fc1", "fc2"], **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Net(), peft.LoraConfig(**config))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_" in name:
                    p.copy_(0.2 * torch.randn_like(p))
        model.save_pretrained(directory)
    return model.double().eval()


def _load(directory: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(Net(), directory).double().eval()


def _delta(model: Any, name: str) -> np.ndarray:
    """What the LoRA branch adds to module `name`'s output on `_x(in)` (the model's own forward)."""
    layer = model.get_submodule(f"base_model.model.{name}")
    inp = _x(layer.in_features)
    with torch.no_grad():
        return (layer(inp) - layer.base_layer(inp)).numpy()


def _dense(model: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(ΔW, scale · b) as PEFT computes them, in float64."""
    layer = model.get_submodule(f"base_model.model.{name}")
    with torch.no_grad():
        dw = layer.get_delta_weight("default").double().numpy()
        bias = layer.lora_B["default"].bias
        sb = np.zeros(dw.shape[0]) if bias is None else layer.scaling["default"] * bias.double().numpy()
    return dw, sb


def _truncate(dw: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(dw)
    return (u[:, :k] * s[:k]) @ vt[:k]


# --- case 1: lora_bias through compress and merge ----------------------------------------------


def test_compress_keeps_scale_times_bias(tmp_path: Path) -> None:
    original = _make(tmp_path / "a", lora_bias=True)
    report = compress(tmp_path / "a", tmp_path / "c", rank=2)
    loaded = _load(tmp_path / "c")
    for name in ("fc1", "fc2"):
        dw, sb = _dense(original, name)
        expected = _x(dw.shape[1]).numpy() @ _truncate(dw, 2).T + sb  # the rank-2 truncation, bias as PEFT applied it
        np.testing.assert_allclose(_delta(loaded, name), expected, rtol=0, atol=1e-6)
    assert report.storage_error < 1e-6 and any("lora_B.bias" in w for w in report.warnings)


def test_merge_of_an_adapter_with_itself_at_half_weights_is_the_adapter(tmp_path: Path) -> None:
    original = _make(tmp_path / "a", lora_bias=True)
    report = merge(tmp_path / "a", tmp_path / "a", tmp_path / "m", weights=(0.5, 0.5))
    merged = _load(tmp_path / "m")
    for name in ("fc1", "fc2"):
        np.testing.assert_allclose(_delta(merged, name), _delta(original, name), rtol=0, atol=1e-6)
    assert report.relative_error < 1e-6
    assert not any("sum to" in w for w in report.warnings)


def test_merge_with_a_negative_weight_keeps_the_sign(tmp_path: Path) -> None:
    a = _make(tmp_path / "a", lora_bias=True, seed=1)
    b = _make(tmp_path / "b", lora_bias=True, seed=2, lora_alpha=-6)  # a negative alpha too
    report = merge(tmp_path / "a", tmp_path / "b", tmp_path / "m", weights=(1.0, -0.5))
    merged = _load(tmp_path / "m")
    for name in ("fc1", "fc2"):
        expected = _delta(a, name) - 0.5 * _delta(b, name)
        np.testing.assert_allclose(_delta(merged, name), expected, rtol=0, atol=1e-6)
    assert any("negative weight" in w for w in report.warnings)


def test_merge_of_a_biased_and_an_unbiased_adapter_carries_the_one_bias(tmp_path: Path) -> None:
    a = _make(tmp_path / "a", lora_bias=True, seed=1)
    b = _make(tmp_path / "b", seed=2)
    merge(tmp_path / "a", tmp_path / "b", tmp_path / "m", weights=(0.7, 0.3))
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["lora_bias"] is True
    merged = _load(tmp_path / "m")
    for name in ("fc1", "fc2"):
        np.testing.assert_allclose(_delta(merged, name), 0.7 * _delta(a, name) + 0.3 * _delta(b, name), atol=1e-6)


def test_merge_says_when_weights_sum_past_one_and_flags_one_sided_heads(tmp_path: Path) -> None:
    _make(tmp_path / "a")
    _make(tmp_path / "b", seed=2, modules_to_save=["head"])
    report = merge(tmp_path / "a", tmp_path / "b", tmp_path / "m", weights=(1.0, 1.0))
    assert any("sum, not the average" in w for w in report.warnings)
    assert any("modules_to_save" in w and "head (from B only)" in w for w in report.warnings)


def test_writers_copy_other_tensors_bit_for_bit(tmp_path: Path) -> None:
    _make(tmp_path / "a", modules_to_save=["head"])
    source = TensorFile(tmp_path / "a" / "adapter_model.safetensors")
    others = Adapter.open(tmp_path / "a").other_tensors
    assert others and all(".head." in n for n in others)
    compress(tmp_path / "a", tmp_path / "c", rank=2)
    merge(tmp_path / "a", tmp_path / "a", tmp_path / "m", weights=(0.5, 0.5))
    for out in ("c", "m"):
        written = TensorFile(tmp_path / out / "adapter_model.safetensors")
        for n in others:
            assert written.read(n).tobytes() == source.read(n).tobytes() and written.info(n).dtype == source.info(n).dtype


# --- case 2: kohya lora_mid (Tucker), dora_scale, LoHa / LoKr, unknown tensors ------------------


def _tucker_file(path: Path, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    r, cin, cout = 3, 5, 6
    t = {
        "lora_unet_conv.lora_down.weight": rng.standard_normal((r, cin, 1, 1)).astype(np.float32),
        "lora_unet_conv.lora_mid.weight": rng.standard_normal((r, r, 3, 3)).astype(np.float32),
        "lora_unet_conv.lora_up.weight": rng.standard_normal((cout, r, 1, 1)).astype(np.float32),
        "lora_unet_conv.alpha": np.array(1.5, dtype=np.float32),
        **(extra or {}),
    }
    save_file(t, str(path))
    return t


def test_kohya_tucker_conv_is_the_update_kohya_applies(tmp_path: Path) -> None:
    t = _tucker_file(tmp_path / "locon.safetensors")
    (module,) = list(Adapter.open(None, weights=tmp_path / "locon.safetensors").modules())
    assert isinstance(module, LoraModule) and module.kind == "conv" and module.scale == pytest.approx(1.5 / 3)
    down, mid, up = (torch.from_numpy(t[f"lora_unet_conv.lora_{p}.weight"]).double() for p in ("down", "mid", "up"))
    x = torch.randn(2, 5, 7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # LyCORIS LoCon with use_tucker: down 1x1, mid kxk (padding 1 here), up 1x1, times alpha / r
    applied = module.scale * F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    dense = module.scale * (np.asarray(module.lora_B, np.float64) @ np.asarray(module.lora_A, np.float64))
    ours = F.conv2d(x, torch.from_numpy(dense.reshape(6, 5, 3, 3)), padding=1)
    np.testing.assert_allclose(ours.numpy(), applied.numpy(), rtol=1e-12, atol=1e-12)
    report = audit(None, weights=tmp_path / "locon.safetensors")
    np.testing.assert_allclose(report.modules[0].singular_values, np.linalg.svd(dense, compute_uv=False)[:3],
                               rtol=1e-10)  # fmt: skip
    assert report.modules[0].params == sum(t[k].size for k in t if k.endswith(".weight"))


def test_kohya_lora_mid_of_the_wrong_shape_refuses_the_module(tmp_path: Path) -> None:
    _tucker_file(tmp_path / "bad.safetensors", {"lora_unet_conv.lora_mid.weight": np.zeros((2, 3, 3, 3), np.float32)})
    (problem,) = audit(None, weights=tmp_path / "bad.safetensors").problems
    assert "lora_mid" in problem["problem"]


def test_kohya_dora_scale_is_flagged_as_dora(tmp_path: Path) -> None:
    _tucker_file(tmp_path / "d.safetensors", {"lora_unet_conv.dora_scale": np.ones((6, 1, 1, 1), np.float32)})
    report = audit(None, weights=tmp_path / "d.safetensors")
    assert report.use_dora and any("DoRA" in w for w in report.warnings) and report.problems == ()


@pytest.mark.parametrize(("keys", "method"), [
    (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa"),
    (("lokr_w1", "lokr_w2_a", "lokr_w2_b"), "LoKr"),
])  # fmt: skip
def test_lycoris_methods_that_are_not_lora_are_named_and_refused(tmp_path: Path, keys: tuple[str, ...], method: str) -> None:
    t = {f"lora_unet_x.{k}": np.ones((2, 2), np.float32) for k in keys}
    t["lora_unet_y.lora_down.weight"], t["lora_unet_y.lora_up.weight"] = np.ones((1, 3), np.float32), np.ones((3, 1), np.float32)
    save_file(t, str(tmp_path / "f.safetensors"))
    with pytest.raises(UnsupportedAdapterError, match=f"{method} tensors .*is not LoRA"):
        audit(None, weights=tmp_path / "f.safetensors")


def test_an_unknown_tensor_under_a_module_refuses_it_by_name(tmp_path: Path) -> None:
    _make(tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = {n: TensorFile(path).read(n) for n in TensorFile(path).names}
    tensors["base_model.model.fc1.lora_C.weight"] = np.zeros((4, 16), np.float32)
    save_file(tensors, str(path))
    report = audit(tmp_path / "a")
    assert [p["module"] for p in report.problems] == ["fc1"]
    assert "base_model.model.fc1.lora_C.weight" in report.problems[0]["problem"]
    assert [m.name for m in report.modules] == ["fc2"]


# --- case 3: PiSSA-style init ---------------------------------------------------------------------


def _pissa(directory: Path) -> Any:
    """An untrained PiSSA adapter on Net (PEFT moves the top singular directions of W into B·A), saved."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights="pissa")
        model = peft.get_peft_model(Net(), config)
        model.save_pretrained(directory)
    return model


def test_unconverted_pissa_adapter_is_warned_everywhere(tmp_path: Path) -> None:
    model = _pissa(tmp_path / "p")
    with torch.no_grad():  # untrained: the model is the base, yet B·A is far from zero
        np.testing.assert_allclose(model(X.float()).numpy(), Net()(X.float()).numpy(), atol=1e-5)
    report = audit(tmp_path / "p")
    assert report.summary.frobenius_norm_total > 0.1
    assert any("init_lora_weights='pissa'" in w for w in report.warnings)
    assert any("pissa" in w for w in compress(tmp_path / "p", tmp_path / "c", rank=2).warnings)
    assert any("pissa" in w for w in compare(tmp_path / "p", tmp_path / "p").warnings)
    assert any("pissa" in w for w in merge(tmp_path / "p", tmp_path / "p", tmp_path / "m").warnings)


def test_converted_pissa_adapter_is_plain_lora_and_matches_peft(tmp_path: Path) -> None:
    model = _pissa(tmp_path / "init")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_" in name:
                    p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    report = audit(tmp_path / "conv")
    assert not any("init_lora_weights" in w for w in report.warnings)
    loaded = _load(tmp_path / "conv")  # on the unmodified base
    for m in report.modules:
        dw, _ = _dense(loaded, m.name)
        np.testing.assert_allclose(m.singular_values, np.linalg.svd(dw, compute_uv=False)[: len(m.singular_values)],
                                   atol=1e-6)  # fmt: skip


# --- case 4: zero modules -------------------------------------------------------------------------


def _zeros_spec(trained: int, zero: int) -> AdapterSpec:
    mods = {f"model.layers.{i}.mlp.down_proj": ModuleSpec(16, 12, [4.0, 3.0, 2.0, 1.0]) for i in range(trained)}
    mods |= {f"model.layers.{i}.mlp.up_proj": ModuleSpec(16, 12, [0.0]) for i in range(zero)}
    return AdapterSpec(mods, r=4, lora_alpha=8)


def test_zero_modules_enter_no_aggregate_and_no_suggestion(tmp_path: Path) -> None:
    d = write_adapter(tmp_path / "a", _zeros_spec(3, 4))
    report = audit(d)
    trained_only = audit(write_adapter(tmp_path / "t", _zeros_spec(3, 0)))
    assert report.summary.n_zero == 4 and len(report.summary.zero_modules) == 4
    assert report.suggestion is not None and trained_only.suggestion is not None
    assert report.suggestion.uniform_median == trained_only.suggestion.uniform_median == 4  # was 1
    for field in ("stable_rank_mean", "utilization_median", "energy_rank_p50", "energy_rank_p90", "effective_rank_mean"):
        assert getattr(report.summary, field) == getattr(trained_only.summary, field)
    assert set(report.suggestion.rank_pattern) == {m for m in _zeros_spec(3, 0).modules}
    assert all(m.status == "ok" for m in report.least_rank_used)
    shares = {m.name: m.energy_share for m in report.modules}
    assert [shares[n] for n in report.summary.zero_modules] == [None] * 4
    total = sum(m.frobenius_norm**2 for m in report.modules if m.status == "ok")  # type: ignore[operator]
    for m in report.modules:
        if m.status == "ok":
            assert m.energy_share == pytest.approx(m.frobenius_norm**2 / total)  # type: ignore[operator]
    out = compress(d, tmp_path / "c", policy="median")
    ranks = {m.name: m.r_after for m in out.modules}
    assert all(ranks[n] == 4 for n in _zeros_spec(3, 0).modules) and sorted(ranks.values()).count(1) == 4


def test_an_all_zero_adapter_gets_no_rank_suggestion(tmp_path: Path) -> None:
    d = write_adapter(tmp_path / "a", _zeros_spec(0, 3))
    report = audit(d)
    assert report.suggestion is None and any("no rank suggestion" in w for w in report.warnings)
    with pytest.raises(UsageError, match="no rank suggestion"):
        compress(d, tmp_path / "c", policy="median")


# --- case 6: strict safetensors, as strict as safetensors itself --------------------------------


def _rewrite(path: Path, edit: Any, tail: bytes = b"") -> Path:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    out = path.with_name("edited.safetensors")
    out.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:] + tail)
    return out


def _two(h: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    a, b = sorted((v for k, v in h.items() if k != "__metadata__"), key=lambda e: e["data_offsets"][0])
    return a, b


def _overlap(h: dict[str, Any]) -> None:
    a, b = _two(h)
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][1] - 4, a["data_offsets"][1] - 4 + size]  # starts inside a


def _hole(h: dict[str, Any]) -> None:
    a, _ = _two(h)
    a["shape"], a["data_offsets"] = [1], [0, 4]  # 4 bytes of the first tensor now belong to nobody


@pytest.mark.parametrize(("edit", "tail", "why"), [
    (_overlap, b"", "overlaps"),
    (_hole, b"", "hole"),
    (lambda h: None, b"\x00" * 8, "after the last tensor"),
])  # fmt: skip
def test_reader_refuses_what_safetensors_refuses(tmp_path: Path, edit: Any, tail: bytes, why: str) -> None:
    from safetensors import SafetensorError, safe_open

    path = tmp_path / "ok.safetensors"
    save_file({"x": np.arange(2, dtype=np.float32), "y": np.arange(3, dtype=np.float32)}, str(path))
    with safe_open(str(path), "np") as fh:  # the untouched file: both accept it
        assert sorted(fh.keys()) == TensorFile(path).names == ["x", "y"]
    bad = _rewrite(path, edit, tail)
    with pytest.raises(SafetensorError), safe_open(str(bad), "np") as fh:
        [fh.get_tensor(k) for k in fh.keys()]  # noqa: SIM118 - safe_open is no dict
    with pytest.raises(AdapterError, match=why):
        TensorFile(bad)


# --- case 8: pattern keys -------------------------------------------------------------------------


def test_two_pattern_keys_on_one_module_warn_and_follow_peft_at_load(tmp_path: Path) -> None:
    trained = _make(tmp_path / "a", alpha_pattern={"fc1": 16, "^fc1": 2})
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    loaded = _load(tmp_path / "a")
    s_train = trained.base_model.model.fc1.scaling["default"]
    s_load = loaded.base_model.model.fc1.scaling["default"]
    report = audit(tmp_path / "a")
    module = next(m for m in report.modules if m.name == "fc1")
    assert module.scale == s_load  # PEFT's rule on the file as saved
    first = next(k for k in config["alpha_pattern"] if re.match(rf"(.*\.)?({k})$", "fc1"))
    assert any("'fc1'" in w and "'^fc1'" in w and f"({first!r})" in w for w in report.warnings)
    # the hazard the warning is about: PEFT saved the keys sorted, so reload picks the other one
    assert (s_train, s_load) == (16 / 4, 2 / 4) and list(config["alpha_pattern"]) == ["^fc1", "fc1"]
    assert "change between training and reload" in " ".join(report.warnings)


def test_an_invalid_regex_key_is_an_error_because_peft_refuses_it(tmp_path: Path) -> None:
    _make(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rank_pattern"] = {"fc1[": 4}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(re.error):  # PEFT's own refusal
        _load(tmp_path / "a")
    with pytest.raises(AdapterError, match=r"not a valid regular expression.*PEFT will refuse") as info:
        Adapter.open(tmp_path / "a")
    assert "\n" not in str(info.value)


# --- config objects validate in their constructor -------------------------------------------------


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "`r`"), ({"r": 2.5}, "`r`"), ({"lora_alpha": float("nan")}, "`lora_alpha`"),
    ({"rank_pattern": {"q": 0}}, "rank_pattern"), ({"alpha_pattern": {"q": float("inf")}}, "alpha_pattern"),
    ({"alpha_pattern": {"(": 1.0}}, "PEFT will refuse"),
])  # fmt: skip
def test_lora_settings_validate_in_the_constructor(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(AdapterError, match=re.escape(field)) as info:
        LoraSettings(**kwargs)
    assert "\n" not in str(info.value)


# --- writers save one unit ------------------------------------------------------------------------


def test_a_crash_under_force_leaves_the_old_adapter_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gradience.lora.writer as writer

    d = write_adapter(tmp_path / "a", _zeros_spec(2, 0))
    compress(d, tmp_path / "out", rank=3)
    (tmp_path / "out" / "README.md").write_text("notes")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def crash(path: Path, data: bytes) -> None:  # dies after the weights, while writing the config
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(writer, "replace_atomic", crash)
    with pytest.raises(OSError):
        compress(d, tmp_path / "out", rank=2, force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]  # no temp folder left
    monkeypatch.undo()
    compress(d, tmp_path / "out", rank=2, force=True)
    assert (tmp_path / "out" / "README.md").read_text() == "notes"
    assert Adapter.open(tmp_path / "out").settings.r == 2


# --- compare: chance level of the overlap ---------------------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(1, 8), (3, 20), (6, 12)])
def test_random_overlap_formula_against_monte_carlo(k: int, n: int) -> None:
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(4000):
        q1, _ = np.linalg.qr(rng.standard_normal((n, k)))
        q2, _ = np.linalg.qr(rng.standard_normal((n, k)))
        draws.append(np.mean(np.square(np.linalg.svd(q1.T @ q2, compute_uv=False))))
    se = np.std(draws) / np.sqrt(len(draws))
    assert abs(np.mean(draws) - random_overlap_sq(k, n)) < 4 * se


# --- case 7 beyond audit: compare and audit --recursive fail on an unreadable module -------------


def _break_fc1(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = {n: TensorFile(path).read(n) for n in TensorFile(path).names if n != "base_model.model.fc1.lora_B.weight"}
    save_file(tensors, str(path))


def test_compare_and_recursive_audit_exit_1_on_an_unreadable_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradience.cli import main

    _make(tmp_path / "all" / "a")
    _make(tmp_path / "all" / "b", seed=2)
    _break_fc1(tmp_path / "all" / "b")
    assert main(["compare", str(tmp_path / "all" / "a"), str(tmp_path / "all" / "b"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [p["module"] for p in report["problems"]] == ["fc1"] and report["n_shared"] == 1
    assert main(["audit", "--recursive", str(tmp_path / "all"), "--workers", "1"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [bool(x["report"]["problems"]) for x in lines] == [False, True]
