"""Two real processes (`torchrun`, gloo, CPU): one writer, no hang, the same numbers.

The workers live in `tests/tiny_trainer.py`. Each run has a timeout, so a collective that
never pairs up fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
if not torch.distributed.is_available():  # pragma: no cover - torch builds without distributed
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

from gradience.integrations.distributed import any_rank  # noqa: E402
from gradience.integrations.snapshot import _canonical  # noqa: E402
from gradience.mechanic.audit import audit  # noqa: E402
from gradience.telemetry import iter_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
# What torch says when FSDP cannot run here; anything else is a failure, not a skip.
_PLATFORM_LIMITS = ("accelerator", "not supported", "NotImplementedError", "requires CUDA")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(mode: str, out: Path) -> None:
    """Run `tests.tiny_trainer <mode>` on 2 CPU ranks; fail with the output on error or hang."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "tests.tiny_trainer", mode, str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the two ranks it started
        output, _ = proc.communicate()
        pytest.fail(f"torchrun {mode} hung for {TIMEOUT_S}s:\n{output.decode(errors='replace')[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun {mode} exited {proc.returncode}:\n{output.decode(errors='replace')[-4000:]}")


# -- DDP: a real 2-rank Trainer run ---------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    _torchrun("ddp", out)
    return out


def _records(path: Path) -> list[dict[str, Any]]:
    return [r.data for r in iter_records(path, strict=True)]


def test_both_ranks_trained_and_only_rank_0_wrote(ddp_run: Path) -> None:
    ranks = [json.loads((ddp_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["parallel_mode"].endswith("DISTRIBUTED") for r in ranks)
    # Same folder on both ranks: a second writer would have rotated the log or added a run.
    # The check inputs come from rank 0 too, with the world size the batch rule needs.
    assert sorted(p.name for p in (ddp_run / "log").iterdir()) == ["config.json", "run.jsonl", "training_args.json"]
    assert json.loads((ddp_run / "log" / "training_args.json").read_text())["world_size"] == 2
    records = _records(ddp_run / "log" / "run.jsonl")
    assert len({r["run_id"] for r in records}) == 1
    assert [r["seq"] for r in records] == list(range(len(records)))
    events = [r["event"] for r in records]
    assert events.count("run_start") == 1 and events.count("run_end") == 1
    steps = [r["step"] for r in records if r["event"] == "train_step"]
    assert steps == [2, 4, 6, 8]  # once per logged step, not once per rank


def test_structural_numbers_equal_a_single_process_computation(ddp_run: Path) -> None:
    records = _records(ddp_run / "log" / "run.jsonl")
    structural = [r for r in records if r["event"] == "metrics" and r["kind"] == "structural"]
    assert [r["step"] for r in structural] == [2, 4, 6, 8]
    last = structural[-1]["modules"]
    # each rank measured its own replica alone: DDP replicas are identical, bit for bit
    for r in (0, 1):
        assert json.loads((ddp_run / f"rank{r}.json").read_text())["modules"] == last
    # and the offline audit of the adapter saved at the end agrees
    report = audit(ddp_run / "peft")
    assert {m.name for m in report.modules} == set(last)
    for m in report.modules:
        assert last[m.name]["frobenius_norm"] == pytest.approx(m.frobenius_norm, rel=1e-5)
        assert last[m.name]["sigma_max"] == pytest.approx(m.sigma_max, rel=1e-5)
        assert last[m.name]["stable_rank"] == pytest.approx(m.stable_rank, rel=1e-5)
        assert last[m.name]["energy_rank_90"] == m.energy_rank_90


# -- FSDP on CPU: snapshots of sharded weights ------------------------------------------------


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("sharded")
    _torchrun("sharded", out)
    result: dict[str, Any] = json.loads((out / "sharded.json").read_text())
    result["out"] = str(out)
    return result


def _skip_if_unsupported(entry: dict[str, Any], what: str) -> None:
    error = entry.get("error")
    if error and any(s in error for s in _PLATFORM_LIMITS):
        pytest.skip(f"{what} does not run on CPU here: {error}")
    assert not error, f"{what} failed: {error}"


@pytest.mark.parametrize("case", ["fsdp1_root", "fsdp1_nested_unwrapped", "fsdp2"])
def test_snapshot_of_sharded_model_equals_the_unsharded_numbers(sharded_run: dict[str, Any], case: str) -> None:
    entry = sharded_run[case]
    _skip_if_unsupported(entry, case)
    ref = sharded_run["reference"]
    # one training step on the same batch: sharded and unsharded weights agree
    assert set(entry["modules"]) == set(ref["modules"])  # names without FSDP's wrapper parts
    for name, metrics in ref["modules"].items():
        for key, value in metrics.items():
            assert entry["modules"][name][key] == pytest.approx(value, rel=1e-6), (name, key)
    if case == "fsdp2":
        assert entry["param_type"] == "DTensor"


def test_lora_grad_norm_sums_the_gradient_shards_over_ranks(sharded_run: dict[str, Any]) -> None:
    # Issue 10: under FSDP each rank holds a shard of every gradient; a rank-local norm is partial.
    entry = sharded_run["lora_grad_norm"]
    _skip_if_unsupported(entry, "FSDP2 fully_shard")
    assert entry["grad_type"] == "DTensor"
    assert entry["fsdp2"] == pytest.approx(entry["unsharded"], rel=1e-5)


def test_a_rank_0_only_failure_disables_snapshots_on_every_rank_without_a_hang(
    sharded_run: dict[str, Any],
) -> None:
    entry = sharded_run["rank0_failure"]
    _skip_if_unsupported(entry, "FSDP2 fully_shard")
    assert entry == {"steps": 10, "errors": 5}  # training ran to the end on both ranks
    records = _records(Path(sharded_run["out"]) / "hang-log" / "run.jsonl")
    alerts = [r for r in records if r["event"] == "alert"]
    assert len(alerts) == 5 and "disabled" in alerts[-1]["message"]
    assert records[-1]["event"] == "run_end"


# -- DeepSpeed ZeRO-3 on its CPU accelerator (gloo) --------------------------------------------


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero3")
    _torchrun("zero3", out)
    result: dict[str, Any] = json.loads((out / "zero3.json").read_text())
    return result


def test_zero3_snapshot_gathers_partitioned_factors_to_the_unsharded_numbers(zero3_run: dict[str, Any]) -> None:
    assert zero3_run["world_size"] == 2 and zero3_run["accelerator"] == "cpu"
    # the factors really were partitioned: an empty local tensor, half of them in each shard
    assert zero3_run["is_sharded"] and zero3_run["ds_status"].endswith("NOT_AVAILABLE")
    assert zero3_run["local_numel"] == 0 and zero3_run["shard_numel"] * 2 == zero3_run["ds_numel"] == 128
    ref = zero3_run["reference"]
    assert set(zero3_run["modules"]) == set(ref["modules"])
    for name, metrics in ref["modules"].items():
        for key, value in metrics.items():
            assert zero3_run["modules"][name][key] == pytest.approx(value, rel=1e-6), (name, key)


# -- single-process pieces -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["base_model.model.bert.encoder.layer.0.attention.self.query",
     "module.base_model.model.bert.encoder.layer.0.attention.self.query",
     "_fsdp_wrapped_module.base_model.model.bert.encoder.layer.0._fsdp_wrapped_module.attention.self.query",
     "_orig_mod.base_model.model.bert.encoder.layer.0._checkpoint_wrapped_module.attention.self.query"],
)  # fmt: skip
def test_wrapper_parts_are_dropped_from_module_names(name: str) -> None:
    assert _canonical(name) == "bert.encoder.layer.0.attention.self.query"


def test_agreement_is_local_without_a_process_group() -> None:
    assert any_rank(True, torch.nn.Linear(2, 2)) is True
    assert any_rank(False, torch.nn.Linear(2, 2)) is False
