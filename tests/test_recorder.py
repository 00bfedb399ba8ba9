"""The plain-PyTorch Recorder in a hand-written training loop."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from gradience.integrations.recorder import Recorder  # noqa: E402
from gradience.telemetry import iter_records, validate_record  # noqa: E402
from tests.tiny_trainer import PlainNet as _Net  # noqa: E402


def test_custom_loop_writes_the_same_records_as_the_callback(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = peft.get_peft_model(_Net(), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    with Recorder(tmp_path, model, structural_interval=5) as rec:
        rec.start(model={"name": "net"}, dataset={"name": "random"})
        for step in range(1, 21):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.train_step(step, loss=loss.item(), lr=1e-2)
            if step % 10 == 0:  # eval first: its snapshot then carries reason "eval"
                rec.eval(step, "test", {"loss": loss.item()})
            rec.maybe_snapshot(step)  # no-op where a snapshot was already taken at this step
    records = [r.data for r in iter_records(tmp_path / "run.jsonl", strict=True)]
    assert all(validate_record(r) == [] for r in records)
    structural = {r["step"]: r for r in records if r["event"] == "metrics"}
    assert set(structural) == {5, 10, 15, 20}
    assert structural[5]["reason"] == "interval" and structural[10]["reason"] == "eval"
    assert list(structural[20]["modules"]) == ["proj"]
    assert structural[20]["metrics"]["frobenius_norm"] > structural[5]["metrics"]["frobenius_norm"] > 0
    assert records[-1]["event"] == "run_end" and records[-1]["status"] == "ok"
    assert records[0]["lora"]["r"] == 4 and records[0]["model"]["name"] == "net"


def test_an_exception_in_the_loop_ends_the_run_with_status_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError), Recorder(tmp_path) as rec:
        rec.start()
        raise ValueError("diverged")
    last = list(iter_records(tmp_path / "run.jsonl"))[-1].data
    assert last["event"] == "run_end" and last["status"] == "error" and "diverged" in last["error"]
