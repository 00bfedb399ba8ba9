"""GradienceCallback through real (tiny) transformers.Trainer runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from gradience.integrations import snapshot as snapshot_mod  # noqa: E402
from gradience.mechanic.audit import audit  # noqa: E402
from gradience.telemetry import iter_records, validate_record  # noqa: E402
from gradience_hf import GradienceCallback, split_eval_metrics  # noqa: E402
from tests.tiny_trainer import Tokens as _Tokens  # noqa: E402
from tests.tiny_trainer import tiny_model as _model  # noqa: E402


def _accuracy(p: Any) -> dict[str, float]:
    return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}


def _trainer(tmp: Path, callbacks: list[Any], max_steps: int = 12, trainer_cls: Any = None, **kw: Any) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(tmp / "hf"), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=5e-3,
        eval_strategy="steps", eval_steps=4, logging_steps=2, save_strategy=kw.pop("save_strategy", "no"),
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, **kw,
    )
    return (trainer_cls or transformers.Trainer)(
        model=kw.pop("model", None) or _model(), args=args, train_dataset=_Tokens(64, 0),
        eval_dataset={"train": _Tokens(16, 1), "test": _Tokens(16, 2)}, compute_metrics=_accuracy, callbacks=callbacks,
    )


def _records(path: Path) -> list[dict[str, Any]]:
    return [r.data for r in iter_records(path, strict=True)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("run")
    cb = GradienceCallback(tmp / "log", structural_interval=3, task_profile="classification", dataset="tokens")
    seen: list[dict[str, Any]] = []

    class Spy(transformers.TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            seen.append(dict(logs or {}))

    trainer = _trainer(tmp, [cb, Spy()])
    trainer.train()
    trainer.evaluate()  # an evaluation after train() ends is recorded too
    trainer.model.save_pretrained(str(tmp / "peft"))
    return tmp, seen, _records(tmp / "log" / "run.jsonl")


def test_every_record_is_valid_and_seq_increases(run: Any) -> None:
    _, _, records = run
    for r in records:
        assert validate_record(r) == [], r
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert records[0]["event"] == "run_start"
    assert any(r["event"] == "run_end" and r["status"] == "ok" for r in records)


def test_run_start_describes_model_lora_and_args(run: Any) -> None:
    start = run[2][0]
    assert start["lora"]["r"] == 4 and sorted(start["lora"]["target_modules"]) == ["query", "value"]
    assert start["task_profile"] == "classification" and start["dataset"] == {"name": "tokens", "num_labels": 2}
    assert start["training_args"]["learning_rate"] == pytest.approx(5e-3)
    assert start["structural_interval"] == 3 and "torch" in start["versions"]
    assert start["model"]["trainable_params"] < start["model"]["n_params"]
    assert start["lora"]["peft_type"] == "LORA" and start["lora"]["task_type"] == "SEQ_CLS"


def test_label_count_is_found_when_the_config_names_the_checkpoint_architecture() -> None:
    # sentence-transformers checkpoints say `BertModel` even once a classification head is built
    from gradience.integrations.hf import _with_num_labels

    model = _model().base_model.model
    model.config.architectures = ["BertModel"]
    assert _with_num_labels({"name": "x"}, model) == {"name": "x", "num_labels": 2}


def test_train_steps_carry_loss_lr_and_lora_grad_norm(run: Any) -> None:
    steps = [r for r in run[2] if r["event"] == "train_step"]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    for r in steps:
        assert r["loss"] > 0 and r["lr"] > 0 and r["lora_grad_norm"] > 0 and r["grad_norm"] > 0


def test_evals_have_split_metrics_and_ppl(run: Any) -> None:
    evals = [r for r in run[2] if r["event"] == "eval"]
    assert {(r["step"], r["split"]) for r in evals} >= {(4, "train"), (4, "test"), (8, "test"), (12, "test")}
    # step 12: the scheduled eval, then the evaluate() called after train() returned
    assert sum(1 for r in evals if r["step"] == 12 and r["split"] == "test") == 2
    assert evals[-1]["seq"] > next(r["seq"] for r in run[2] if r["event"] == "run_end")
    for r in evals:
        assert r["metrics"]["ppl"] == pytest.approx(math.exp(r["metrics"]["loss"]))
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0 and "runtime" in r["timing"]


def test_structural_snapshots_on_interval_and_at_every_eval_step(run: Any) -> None:
    records = run[2]
    structural = [r for r in records if r["event"] == "metrics" and r["kind"] == "structural"]
    by_step = {r["step"]: r for r in structural}
    assert len(by_step) == len(structural)  # at most one per step
    eval_steps = {r["step"] for r in records if r["event"] == "eval"}
    assert eval_steps <= set(by_step)
    assert {3, 6, 9} <= set(by_step) and by_step[3]["reason"] == "interval" and by_step[4]["reason"] == "eval"
    for r in structural:
        mods = r["modules"]
        assert len(mods) == 4 and r["cost_ms"] > 0
        frob = math.sqrt(sum(m["frobenius_norm"] ** 2 for m in mods.values()))
        assert r["metrics"]["frobenius_norm"] == pytest.approx(frob)
        assert r["metrics"]["stable_rank"] == pytest.approx(np.mean([m["stable_rank"] for m in mods.values()]))


def test_live_snapshot_agrees_with_the_offline_audit(run: Any) -> None:
    tmp, _, records = run
    last = [r for r in records if r["event"] == "metrics" and r["kind"] == "structural"][-1]
    report = audit(tmp / "peft")
    for m in report.modules:
        live = last["modules"][m.name]
        assert live["frobenius_norm"] == pytest.approx(m.frobenius_norm, rel=1e-5)
        assert live["sigma_max"] == pytest.approx(m.sigma_max, rel=1e-5)
        assert live["energy_rank_90"] == m.energy_rank_90


def test_structural_scalars_are_mirrored_into_the_trainer_logs(run: Any) -> None:
    train_logs = [s for s in run[1] if "loss" in s and "eval_loss" not in s]
    assert all("lora/frobenius_norm" in s and "lora/stable_rank" in s for s in train_logs[1:])


@pytest.mark.parametrize(
    ("metrics", "split"),
    [({"eval_loss": 1.0}, "eval"), ({"eval_test_loss": 1.0}, "test"), ({"test_loss": 1.0}, "test"),
     ({"train_loss": 1.0}, "train"), ({"eval_my_val_loss": 1.0, "eval_my_val_runtime": 2.0}, "my_val")],
)
def test_split_is_taken_from_the_metric_prefix(metrics: dict[str, float], split: str) -> None:
    got, values, timing = split_eval_metrics(metrics)
    assert got == split and values["loss"] == 1.0
    assert timing == ({"runtime": 2.0} if "eval_my_val_runtime" in metrics else {})


def test_nan_loss_is_logged_as_null_with_an_alert(tmp_path: Path) -> None:
    class NanTrainer(transformers.Trainer):  # type: ignore[misc]
        def compute_loss(self, model: Any, inputs: Any, *a: Any, **kw: Any) -> Any:
            out = super().compute_loss(model, inputs, *a, **kw)
            if self.state.global_step >= 3 and isinstance(out, torch.Tensor):
                return out * float("nan")
            return out

    cb = GradienceCallback(tmp_path / "log", structural_interval=2)
    _trainer(tmp_path, [cb], max_steps=6, trainer_cls=NanTrainer, logging_nan_inf_filter=False).train()
    records = _records(tmp_path / "log" / "run.jsonl")
    nan_steps = [r for r in records if r["event"] == "train_step" and r["loss"] is None]
    assert nan_steps and all("loss" in r["nonfinite"] for r in nan_steps)
    assert any(r["event"] == "alert" and r["code"] == "nonfinite_loss" for r in records)
    # the NaN gradients reach the weights: later snapshots say so instead of failing
    late = [r for r in records if r["event"] == "metrics" and r["step"] >= 6]
    assert late and late[-1]["metrics"]["frobenius_norm"] is None and "metrics.frobenius_norm" in late[-1]["nonfinite"]
    assert records[-1]["event"] == "run_end"


def test_eval_only_run_is_recorded(tmp_path: Path) -> None:
    cb = GradienceCallback(tmp_path / "log")
    _trainer(tmp_path, [cb]).evaluate()
    events = [(r["event"], r.get("kind")) for r in _records(tmp_path / "log" / "run.jsonl")]
    assert events[0] == ("run_start", None)
    assert ("eval", None) in events and ("metrics", "structural") in events


def test_an_exception_inside_the_callback_never_stops_training(tmp_path: Path, monkeypatch: Any) -> None:
    def boom(*a: Any, **kw: Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(snapshot_mod, "take_snapshot", boom)
    cb = GradienceCallback(tmp_path / "log", structural_interval=2)
    with pytest.warns(UserWarning, match="injected"):
        state = _trainer(tmp_path, [cb], max_steps=6).train()
    assert state.global_step == 6
    records = _records(tmp_path / "log" / "run.jsonl")
    alerts = [r for r in records if r["event"] == "alert" and r["code"] == "gradience_internal_error"]
    assert alerts and "injected" in alerts[0]["message"]
    assert records[-1]["event"] == "run_end" and records[-1]["status"] == "ok"


def test_resume_from_checkpoint_appends_and_keeps_history(tmp_path: Path) -> None:
    log = tmp_path / "log" / "run.jsonl"
    _trainer(tmp_path, [GradienceCallback(tmp_path / "log", structural_interval=3)], max_steps=6,
             save_strategy="steps", save_steps=6).train()
    first = log.read_bytes()
    trainer = _trainer(tmp_path, [GradienceCallback(tmp_path / "log", structural_interval=3)], max_steps=10,
                       save_strategy="no")
    trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-6"))
    assert log.read_bytes().startswith(first)
    records = _records(log)
    assert [r["event"] for r in records].count("run_start") == 1
    resume = next(r for r in records if r["event"] == "run_resume")
    assert resume["step"] == 6
    assert len({r["run_id"] for r in records}) == 1
    assert max(r["step"] for r in records if r["event"] == "train_step") == 10


def test_misconfiguration_fails_at_construction(tmp_path: Path) -> None:
    from gradience.errors import UsageError

    with pytest.raises(UsageError, match="structural_interval"):
        GradienceCallback(tmp_path, structural_interval=-1)
    with pytest.raises(UsageError, match="eval_policy"):
        GradienceCallback(tmp_path, eval_policy="sometimes")


def test_a_new_run_never_overwrites_an_old_log(tmp_path: Path) -> None:
    log = tmp_path / "log" / "run.jsonl"
    log.parent.mkdir()
    log.write_text(json.dumps({"schema": "gradience.run/1", "ts": 1.0, "run_id": "old", "seq": 0,
                               "event": "run_start", "step": 0}) + "\n")
    old = log.read_bytes()
    with pytest.warns(UserWarning, match="earlier run"):
        _trainer(tmp_path, [GradienceCallback(tmp_path / "log")], max_steps=2).train()
    assert (tmp_path / "log" / "run.prev-1.jsonl").read_bytes() == old
    assert _records(log)[0]["run_id"] != "old"


# -- issue 10: snapshots of causal-LM-era runs --------------------------------------------------


def _epoch_trainer(tmp: Path, callbacks: list[Any]) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(tmp / "hf"), max_steps=16, per_device_train_batch_size=8, learning_rate=5e-3,
        eval_strategy="epoch", logging_steps=2, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    return transformers.Trainer(model=_model(), args=args, train_dataset=_Tokens(64, 0),
                                eval_dataset=_Tokens(16, 2), callbacks=callbacks)  # fmt: skip


def test_epoch_and_manual_evals_get_a_same_step_eval_snapshot(tmp_path: Path) -> None:
    # eval_strategy="epoch" decides the eval after on_step_end, where the interval snapshot of
    # that step was already taken: the eval still gets its own record, labelled `eval`.
    trainer = _epoch_trainer(tmp_path, [GradienceCallback(tmp_path, structural_interval=4)])
    trainer.train()
    trainer.evaluate()  # outside any schedule, at the step of the `final` snapshot
    records = [r.data for r in iter_records(tmp_path / "run.jsonl")]
    evals = [r["step"] for r in records if r["event"] == "eval"]
    assert evals == [8, 16, 16]
    structural = [(r["step"], r["reason"]) for r in records if r.get("kind") == "structural"]
    for step in (8, 16):
        assert (step, "eval") in structural
    copies = [r for r in records if r.get("kind") == "structural" and "copied_from" in r]
    # Step 16: the interval snapshot, copied for the epoch eval; the final snapshot and the manual
    # evaluate() at that step find it there (one computed snapshot per step).
    assert {(c["step"], c["copied_from"]) for c in copies} == {(8, "interval"), (16, "interval")}
    original = next(r for r in records if r.get("kind") == "structural" and (r["step"], r["reason"]) == (8, "interval"))
    assert copies[0]["metrics"] == original["metrics"] and "cost_ms" not in copies[0]


def test_zero_modules_are_listed_and_left_out_of_the_means() -> None:
    model = _model()  # PEFT starts lora_B at zero: every update is exactly zero
    snap = snapshot_mod.take_snapshot(model)
    assert snap is not None and len(snap.zero_modules) == snap.n_modules == 4
    assert set(snap.metrics) == {"frobenius_norm", "sigma_max"} and snap.metrics["frobenius_norm"] == 0.0
    live = "bert.encoder.layer.0.attention.self.query"
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if live in n and "lora_B" in n).normal_()
    snap = snapshot_mod.take_snapshot(model)
    assert snap is not None and live not in snap.zero_modules and len(snap.zero_modules) == 3
    for key in ("stable_rank", "energy_rank_90", "utilization"):
        assert snap.metrics[key] == pytest.approx(snap.modules[live][key])  # the mean of the one live module
    fields = snap.record_fields()
    assert fields["n_zero_modules"] == 3 and live not in fields["zero_modules"]


def test_several_adapters_are_keyed_by_name_and_dora_is_flagged() -> None:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=16)  # fmt: skip
    model = peft.get_peft_model(transformers.BertModel(cfg), peft.LoraConfig(r=4, target_modules=["query", "value"]))
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["query"], use_dora=True))
    model.base_model.set_adapter(["default", "second"])  # both train: PEFT allows several active adapters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    snap = snapshot_mod.take_snapshot(model)
    assert snap is not None and snap.n_modules == 6
    default = {k for k in snap.modules if k.startswith("default:")}
    second = {k for k in snap.modules if k.startswith("second:")}
    assert len(default) == 4 and len(second) == 2 and default | second == set(snap.modules)
    assert set(snap.dora_modules) == second
    assert set(snap.adapters) == {"default", "second"}
    assert snap.adapters["second"]["sigma_max"] == max(snap.modules[k]["sigma_max"] for k in second)
    fields = snap.record_fields()
    assert "B·A" in str(fields["dora_note"]) and fields["adapters"] == snap.adapters


def test_cpu_snapshot_runs_single_threaded_and_restores_the_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 10, finding 7: on a busy CPU the tiny r×r products stalled on descheduled threads.
    seen: list[int] = []
    real = snapshot_mod._grams

    def spy(m: Any) -> Any:
        seen.append(torch.get_num_threads())
        return real(m)

    monkeypatch.setattr(snapshot_mod, "_grams", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        snap = snapshot_mod.take_snapshot(_model(random_b=True))
        assert snap is not None and seen == [1] * snap.n_modules
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_unknown_check_task_fails_before_training(tmp_path: Path) -> None:
    from gradience.errors import UsageError

    with pytest.raises(UsageError, match="unknown task 'sst3'"):
        GradienceCallback(tmp_path, check_task="sst3")


def test_model_names_keep_hub_ids_and_local_folder_names(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from gradience.integrations.run_check import model_identity

    hub = SimpleNamespace(config=SimpleNamespace(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert model_identity(hub) == {"class": "SimpleNamespace", "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                   "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # fmt: skip
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    local = SimpleNamespace(config=SimpleNamespace(name_or_path=str(folder)))
    assert model_identity(local)["name"] == "smollm2-135m-instruct"
    assert model_identity(local)["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "/home/alice/models/smol"}))
    assert "hub_id" not in model_identity(local)  # a path is not a hub id
    assert model_identity(local, "my-name")["name"] == "my-name"
