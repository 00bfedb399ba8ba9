"""`gradience audit --recursive`: every adapter under a folder, in parallel, one JSON line each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradience.errors import UsageError
from gradience.mechanic.audit import audit
from gradience.mechanic.audit_many import AdapterResult, audit_many, find_adapters
from tests.factories import AdapterSpec, ModuleSpec, write_adapter

GRADIENCE = str(Path(sys.executable).parent / "gradience")


def _spec(sigma: list[float]) -> AdapterSpec:
    modules = {
        "model.layers.0.self_attn.q_proj": ModuleSpec(16, 24, sigma),
        "model.layers.1.mlp.down_proj": ModuleSpec(24, 16, sigma[:2]),
    }
    return AdapterSpec(modules=modules, r=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three good adapters at different depths, one with truncated weights, one stray file."""
    root = tmp_path_factory.mktemp("sweep")
    write_adapter(root / "r4" / "seed1" / "peft", _spec([3.0, 1.0, 0.5]), dtype=np.float32)
    write_adapter(root / "r4" / "seed2" / "peft", _spec([2.0, 2.0]), dtype=np.float32, seed=5)
    write_adapter(root / "r10", _spec([1.0]), dtype=np.float32, seed=9)
    broken = write_adapter(root / "r4" / "seed3" / "peft", _spec([1.0, 0.5]), dtype=np.float32)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a download cut short
    (root / "notes.txt").write_text("not an adapter")
    return root


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRADIENCE, "audit", *args], capture_output=True, text=True, timeout=300, check=False)


def test_cli_audits_every_adapter_and_reports_the_broken_one(tree: Path) -> None:
    proc = _run("--recursive", str(tree), "--workers", "2")
    assert proc.returncode == 1, proc.stderr  # one adapter failed
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [Path(d["path"]).relative_to(tree).as_posix() for d in lines] == [
        "r4/seed1/peft", "r4/seed2/peft", "r4/seed3/peft", "r10",
    ]  # natural path order, whatever order the workers finished in
    good = [d for d in lines if d["ok"]]
    bad = [d for d in lines if not d["ok"]]
    assert len(good) == 3 and len(bad) == 1
    assert set(bad[0]) == {"path", "ok", "error"}
    assert "adapter_model.safetensors" in bad[0]["error"] and "\n" not in bad[0]["error"]
    for d in good:  # the same report a single `audit` gives, without per-module rows
        assert d["report"] == json.loads(json.dumps(audit(d["path"]).to_dict(include_modules=False)))
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("[")]
    assert [ln.split()[0] for ln in progress] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert sum("FAILED" in ln for ln in progress) == 1


def test_cli_exits_0_when_every_adapter_is_good(tree: Path) -> None:
    proc = _run("--recursive", str(tree / "r4" / "seed1"), "--workers", "1", "--layers")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert len(json.loads(line)["report"]["modules"]) == 2


def test_cli_usage_errors(tmp_path: Path) -> None:
    empty = _run("--recursive", str(tmp_path))
    assert empty.returncode == 2 and "no adapter_config.json" in empty.stderr
    assert _run("--recursive", str(tmp_path / "missing")).returncode == 2
    assert _run("--recursive", str(tmp_path), "--workers", "0").returncode == 2


def test_library_yields_one_result_per_adapter_in_order(tree: Path) -> None:
    seen: list[tuple[int, int]] = []
    results = list(audit_many(tree, workers=1, on_result=lambda k, n, _: seen.append((k, n))))
    assert [r.path for r in results] == [str(p) for p in find_adapters(tree)]
    assert [r.ok for r in results] == [True, True, False, True]
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(isinstance(r, AdapterResult) for r in results)
    with pytest.raises(UsageError):
        list(audit_many(tree / "notes.txt"))


def test_one_place_to_run_the_audits(tree: Path) -> None:
    """--workers and --scheduler (or an executor) each choose where audits run: both is refused,
    naming the two, before any cluster is contacted."""
    cli = _run("--recursive", str(tree), "--workers", "2", "--scheduler", "tcp://127.0.0.1:1")
    assert cli.returncode == 2 and "--workers and --scheduler" in cli.stderr and "Traceback" not in cli.stderr
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool, pytest.raises(UsageError, match="give one of them"):
        audit_many(tree, workers=2, executor=pool)
