"""Single-file kohya-ss / diffusers LoRA (`lora_down` / `lora_up` / `alpha`): read-only audit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradience.errors import AdapterError, UnsupportedAdapterError, UsageError
from gradience.lora.reader import Adapter, parse_lora_key
from gradience.lora.writer import write_safetensors
from gradience.mechanic.audit import audit
from tests.factories import expected_metrics, factors

GRADIENCE = str(Path(sys.executable).parent / "gradience")
LINEAR = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
UNET = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV = "lora_unet_conv_in"


def kohya_file(
    path: Path, alphas: dict[str, float | None], r: int = 4, down: str = ".lora_down.weight",
    up: str = ".lora_up.weight", names: dict[str, str] | None = None,
) -> dict[str, list[float]]:
    """Three modules (two linear, one 3x3 conv) with known σ of ΔW = (alpha / r) · up · down."""
    sigmas = {LINEAR: [3.0, 1.0, 0.5], UNET: [2.0, 2.0], CONV: [4.0, 0.25]}
    shapes = {LINEAR: (24, 16, ()), UNET: (20, 20, ()), CONV: (8, 3, (3, 3))}
    tensors: dict[str, np.ndarray] = {}
    for i, (mod, sig) in enumerate(sigmas.items()):
        out_f, in_f, kernel = shapes[mod]
        alpha = alphas.get(mod)
        scale = (alpha if alpha is not None else r) / r
        a, b = factors(out_f, in_f * int(np.prod(kernel, dtype=int)), sig, r, scale, seed=i)
        key = (names or {}).get(mod, mod)
        tensors[key + down] = a.reshape(r, in_f, *kernel).astype(np.float32)
        tensors[key + up] = b.reshape(out_f, r, *((1, 1) if kernel else ())).astype(np.float32)
        if alpha is not None:
            tensors[key + ".alpha"] = np.array(alpha, dtype=np.float16)  # kohya: a 0-d tensor
    write_safetensors(path, tensors)
    return sigmas


def test_kohya_file_matches_closed_form(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    sigmas = kohya_file(path, {LINEAR: 2.0, UNET: 8.0, CONV: 1.0})
    report = audit(None, weights=path)
    assert (report.format, report.peft_dir, report.config_path) == ("kohya", None, None)
    rows = {m.name: m for m in report.modules}
    assert set(rows) == set(sigmas)
    for name, sig in sigmas.items():
        row = rows[name]
        exp = expected_metrics(sig, 4, row.shape)
        for key, value in exp.items():
            assert getattr(row, key) == pytest.approx(value, rel=1e-5), (name, key)
    assert (rows[LINEAR].alpha, rows[LINEAR].scale) == (2.0, 0.5)
    assert (rows[UNET].scale, rows[CONV].scale) == (2.0, 0.25)
    assert rows[CONV].kind == "conv" and rows[CONV].shape == (8, 27)  # (r, in, kh, kw) flattened
    assert rows[LINEAR].type == "attn" and rows[LINEAR].layer == 0
    assert report.r == 4 and report.lora_alpha == 2.0  # the file's summary: median alpha


def test_alpha_absent_means_alpha_equals_r(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    sigmas = kohya_file(path, {LINEAR: 2.0})  # UNET and CONV have no alpha
    rows = {m.name: m for m in audit(None, weights=path).modules}
    assert (rows[UNET].alpha, rows[UNET].scale) == (4.0, 1.0)
    assert (rows[LINEAR].alpha, rows[LINEAR].scale) == (2.0, 0.5)
    for name, sig in sigmas.items():
        assert rows[name].singular_values[: len(sig)] == pytest.approx(sig, rel=1e-5)


@pytest.mark.parametrize(
    ("down", "up", "names"),
    [
        (".lora.down.weight", ".lora.up.weight",
         {LINEAR: "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
          UNET: "unet.down_blocks.0.attentions.0.proj_in", CONV: "unet.conv_in"}),
        ("_lora.down.weight", "_lora.up.weight",
         {LINEAR: "text_encoder.layers.0.self_attn.q_proj",
          UNET: "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q",
          CONV: "conv_in"}),
        (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight",
         {LINEAR: "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
          UNET: "unet.mid_block.attentions.0.proj_in", CONV: "unet.conv_in"}),
        (".lora_A.weight", ".lora_B.weight",  # diffusers' PEFT spelling, with no adapter_config.json
         {LINEAR: "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
          UNET: "unet.down_blocks.0.attentions.0.proj_in", CONV: "unet.conv_in"}),
    ],
)
def test_diffusers_spellings(tmp_path: Path, down: str, up: str, names: dict[str, str]) -> None:
    path = tmp_path / "pytorch_lora_weights.safetensors"
    sigmas = kohya_file(path, {LINEAR: 2.0}, down=down, up=up, names=names)
    report = audit(None, weights=path)
    assert report.format == "kohya"
    rows = {m.name: m for m in report.modules}
    assert set(rows) == set(names.values())
    for mod, sig in sigmas.items():
        assert rows[names[mod]].singular_values[: len(sig)] == pytest.approx(sig, rel=1e-5), mod
    assert rows[names[LINEAR]].scale == 0.5 and rows[names[UNET]].scale == 1.0


def test_parse_kohya_keys() -> None:
    assert parse_lora_key(f"{UNET}.lora_down.weight", "kohya") == (UNET, "lora_A", None)
    assert parse_lora_key(f"{UNET}.alpha", "kohya") == (UNET, "alpha", None)
    assert parse_lora_key("a.to_q.lora_linear_layer.up.weight", "kohya") == ("a.to_q", "lora_B", None)
    assert parse_lora_key("x_lora_down.weight", "kohya") is None
    assert parse_lora_key("model.conv_in.weight", "kohya") is None


def test_module_with_only_alpha_or_a_rank_mismatch_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    kohya_file(path, {LINEAR: 2.0})
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    tensors["lora_unet_orphan.alpha"] = np.array(4.0, np.float16)
    tensors[f"{UNET}.lora_up.weight"] = np.ones((20, 3), np.float32)
    write_safetensors(path, tensors)
    report = audit(None, weights=path)
    problems = {p["module"]: p["problem"] for p in report.problems}
    assert "only alpha but no lora_down" in problems["lora_unet_orphan"]
    assert "lora_down has rank 4 but lora_up has rank 3" in problems[UNET]
    assert report.summary.n_modules == 2


def test_file_with_no_lora_keys_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"model.conv_in.weight": np.ones((4, 4), np.float32)})
    with pytest.raises(AdapterError, match="no LoRA tensors \\(lora_down / lora_up\\) found"):
        audit(None, weights=path)


def test_loha_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loha.safetensors"
    write_safetensors(path, {f"{UNET}.hada_w1_a": np.ones((4, 4), np.float32)})
    with pytest.raises(UnsupportedAdapterError, match="LoHa"):
        audit(None, weights=path)


def test_format_kohya_with_a_folder_and_no_file_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--weights FILE"):
        Adapter.open(tmp_path, fmt="kohya")
    with pytest.raises(UsageError, match="--weights FILE"):
        audit(None)


# --- CLI ------------------------------------------------------------------------------------


def gradience(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRADIENCE, *args], capture_output=True, text=True, timeout=120, check=False)


def test_cli_weights_alone_audits_a_kohya_file(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    kohya_file(path, {LINEAR: 2.0, UNET: 8.0, CONV: 1.0})
    proc = gradience("audit", "--weights", str(path), "--json", "--layers")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == json.loads(json.dumps(audit(None, weights=path).to_dict()))
    assert (got["format"], got["peft_dir"], got["config_path"]) == ("kohya", None, None)
    text = gradience("audit", "--weights", str(path), "--layers")
    assert text.returncode == 0, text.stderr
    assert "Format: kohya/diffusers single file (scale = alpha / r)" in text.stdout
    assert "PEFT dir:" not in text.stdout and f"  {CONV}  " in text.stdout
    assert "--weights FILE" in gradience("audit", "--help").stdout


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        ((), 2, "no input given; pass an adapter folder or a .safetensors file"),
        (("--weights", "{plain}"), 1, "no LoRA tensors (lora_down / lora_up) found"),
        (("--weights", "{file}", "--format", "peft"), 2, "no adapter_config.json beside it"),
    ],
)
def test_cli_refusals_are_one_line(tmp_path: Path, args: tuple[str, ...], code: int, fragment: str) -> None:
    kohya_file(tmp_path / "lora.safetensors", {})
    write_safetensors(tmp_path / "model.safetensors", {"w": np.ones((2, 2), np.float32)})
    subs = {"{file}": str(tmp_path / "lora.safetensors"), "{plain}": str(tmp_path / "model.safetensors")}
    proc = gradience("audit", *(subs.get(a, a) for a in args))
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], proc.stderr
