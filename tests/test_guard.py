"""The guard: its pure policy, and rollbacks in a plain PyTorch loop and a real tiny Trainer run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from gradience.errors import UsageError
from gradience.integrations.guard import (
    GIVE_UP,
    NONE,
    ROLLBACK,
    SNAPSHOT,
    STOP,
    GuardConfig,
    GuardPolicy,
)

NAN = float("nan")

# --- the policy (no torch) ---------------------------------------------------------------


def _run(policy: GuardPolicy, steps: dict[int, tuple[float | None, float | None]], n: int) -> dict[int, Any]:
    """Feed steps 1..n; `steps` overrides (loss, grad_norm), the default is a healthy (1.0, 1.0)."""
    return {s: policy.decide(s, *steps.get(s, (1.0, 1.0))) for s in range(1, n + 1)}


def test_healthy_steps_snapshot_every_k() -> None:
    got = _run(GuardPolicy(GuardConfig(snapshot_every=4)), {}, 12)
    assert [s for s, d in got.items() if d.action == SNAPSHOT] == [4, 8, 12]
    assert all(d.action in (NONE, SNAPSHOT) for d in got.values())


@pytest.mark.parametrize(("loss", "norm", "reason"), [(NAN, 1.0, "nonfinite_loss"), (math.inf, None, "nonfinite_loss"),
                                                      (1.0, math.inf, "nonfinite_grad_norm"),
                                                      (None, NAN, "nonfinite_grad_norm")])  # fmt: skip
def test_a_nonfinite_step_rolls_back_to_the_last_snapshot(loss: Any, norm: Any, reason: str) -> None:
    got = _run(GuardPolicy(GuardConfig(snapshot_every=4)), {6: (loss, norm)}, 6)
    d = got[6]
    assert d.action == ROLLBACK and d.reason == reason and d.restored_to == 4
    assert "step 6" in d.message and "step 4" in d.message


def test_spike_is_judged_against_the_median_of_good_steps_once_history_exists() -> None:
    cfg = GuardConfig(spike_factor=5.0, min_history=3, snapshot_every=100)
    policy = GuardPolicy(cfg)
    assert policy.decide(1, 1.0, 1000.0).action == NONE  # no history yet: not judged
    for step, norm in zip(range(2, 5), (1.0, 2.0, 3.0), strict=True):
        assert policy.decide(step, 1.0, norm).action == NONE
    assert policy.threshold() == pytest.approx(5.0 * 2.5)  # median of 1000, 1, 2, 3
    assert policy.decide(5, 1.0, 12.0).action == NONE  # under 12.5: good, and now in the median
    d = policy.decide(6, 1.0, 16.0)
    assert d.action == ROLLBACK and d.reason == "grad_norm_spike" and d.threshold == pytest.approx(15.0)
    assert 16.0 not in policy.good_norms  # a bad step never enters the median


def test_cooldown_pauses_snapshots_but_not_rollbacks() -> None:
    policy = GuardPolicy(GuardConfig(snapshot_every=2, cooldown=3, max_rollbacks=10))
    got = _run(policy, {5: (NAN, None), 7: (NAN, None)}, 12)
    assert got[5].action == ROLLBACK and got[5].restored_to == 4
    # 6 is good but inside the cooldown; 7 is bad: back to 4 again, and the cooldown restarts
    assert got[6].action == NONE and got[7].action == ROLLBACK and got[7].restored_to == 4
    assert [got[s].action for s in (8, 9, 10)] == [NONE, NONE, NONE]
    assert got[11].action == SNAPSHOT and got[12].action == NONE


def test_rollbacks_are_counted_within_a_window_ending_at_the_current_step() -> None:
    cfg = GuardConfig(snapshot_every=1, cooldown=0, max_rollbacks=2, rollback_window=10)
    policy = GuardPolicy(cfg)
    got = _run(policy, {3: (NAN, None), 5: (NAN, None), 14: (NAN, None), 15: (NAN, None)}, 15)
    assert got[3].action == ROLLBACK and got[5].action == ROLLBACK
    assert got[14].action == ROLLBACK  # window 5..14 holds one rollback (5): under the max
    assert got[15].action == ROLLBACK  # window 6..15 holds one (14)
    assert policy.decide(16, NAN, None).action == STOP  # window 7..16 holds two (14, 15)


@pytest.mark.parametrize(("on_exhausted", "action"), [("stop", STOP), ("continue", GIVE_UP)])
def test_past_max_rollbacks_the_guard_stops_or_gives_up(on_exhausted: str, action: str) -> None:
    cfg = GuardConfig(snapshot_every=2, cooldown=0, max_rollbacks=2, on_exhausted=on_exhausted)
    policy = GuardPolicy(cfg)
    got = _run(policy, {s: (NAN, None) for s in range(5, 9)}, 10)
    assert [got[s].action for s in (5, 6, 7)] == [ROLLBACK, ROLLBACK, action]
    assert got[7].stop is (action == STOP)
    assert got[7].restored_to == (4 if action == STOP else None)
    assert "max_rollbacks=2" in got[7].message
    assert all(got[s].action == NONE for s in (8, 9, 10)) and not policy.active  # off for good


@pytest.mark.parametrize(
    ("kw", "field"),
    [({"snapshot_every": 0}, "snapshot_every"), ({"spike_factor": 1.0}, "spike_factor"),
     ({"cooldown": -1}, "cooldown"), ({"max_rollbacks": 0}, "max_rollbacks"), ({"on_exhausted": "panic"}, "on_exhausted"),
     ({"min_history": 60, "median_window": 50}, "min_history"), ({"rollback_window": True}, "rollback_window")],
)  # fmt: skip
def test_bad_config_names_the_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(UsageError, match=field):
        GuardConfig(**kw)


# --- torch ---------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from gradience.integrations.guard import Guard, _clone  # noqa: E402
from gradience.integrations.recorder import Recorder  # noqa: E402
from gradience.telemetry import iter_records  # noqa: E402


def _records(path: Path) -> list[dict[str, Any]]:
    return [r.data for r in iter_records(path, strict=True)]


def _trainable(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_state(a: Any, b: Any) -> None:
    """Tensors equal bit for bit (NaN-free), everything else equal, at any nesting."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_state(x, y)
    else:
        assert a == b


from tests.tiny_trainer import PlainNet as _Net  # noqa: E402


def _loop(tmp: Path, cfg: GuardConfig | None, faults: dict[int, float], n: int) -> dict[str, Any]:
    """A hand-written AdamW loop; `faults[step]` multiplies that step's loss (NaN, 1e4, ...)."""
    torch.manual_seed(0)
    model = peft.get_peft_model(_Net(), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    seen: dict[int, Any] = {}
    with Recorder(tmp, model, structural_interval=0) as rec:
        rec.start()
        guard = Guard(model, opt, cfg, recorder=rec) if cfg else None
        for step in range(1, n + 1):
            loss = torch.nn.functional.mse_loss(model(x), y) * faults.get(step, 1.0)
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # pre-clip norm
            opt.step()
            decision = guard.after_step(step, loss.item(), norm) if guard else None
            seen[step] = {"decision": decision, "params": _trainable(model), "opt": _clone(opt.state_dict())}
            if decision is not None and decision.stop:
                break
    return {"seen": seen, "records": _records(tmp / "run.jsonl"), "model": model}


def test_plain_loop_rollback_restores_weights_and_optimizer_state_exactly(tmp_path: Path) -> None:
    cfg = GuardConfig(snapshot_every=5, cooldown=3, min_history=3)
    out = _loop(tmp_path, cfg, {8: NAN, 10: 1e4}, 14)
    seen = out["seen"]
    assert seen[5]["decision"].action == SNAPSHOT
    d8, d10 = seen[8]["decision"], seen[10]["decision"]
    assert (d8.action, d8.reason, d8.restored_to) == (ROLLBACK, "nonfinite_loss", 5)
    # 10 is a spike inside the cooldown (no snapshot since 5): back to 5 again, and the snapshot
    # is intact although the optimizer updated its restored tensors in place at 9
    assert (d10.action, d10.reason, d10.restored_to) == (ROLLBACK, "grad_norm_spike", 5)
    for bad in (8, 10):
        _assert_same_state(seen[bad]["params"], seen[5]["params"])
        _assert_same_state(seen[bad]["opt"]["state"], seen[5]["opt"]["state"])
        assert seen[bad]["opt"]["state"][0]["step"] == 5  # Adam's bias correction rewinds too
    assert not any(d["decision"].action == SNAPSHOT for s, d in seen.items() if 5 < s <= 13)
    assert seen[14]["decision"].action == SNAPSHOT  # three good steps 11..13, then due
    alerts = [r for r in out["records"] if r["event"] == "alert"]
    assert [(a["step"], a["code"], a["reason"], a["restored_to_step"]) for a in alerts] == [
        (8, "guard_rollback", "nonfinite_loss", 5), (10, "guard_rollback", "grad_norm_spike", 5)]
    assert alerts[0]["loss"] is None and "loss" in alerts[0]["nonfinite"]
    assert all(torch.isfinite(p).all() for p in out["model"].parameters())


def test_plain_loop_on_exhausted_continue_leaves_the_run_alone(tmp_path: Path) -> None:
    cfg = GuardConfig(snapshot_every=2, cooldown=0, max_rollbacks=1, on_exhausted="continue")
    out = _loop(tmp_path, cfg, {5: NAN, 6: NAN}, 8)
    seen = out["seen"]
    assert seen[5]["decision"].action == ROLLBACK and seen[6]["decision"].action == GIVE_UP
    assert len(seen) == 8  # not stopped
    assert not torch.isfinite(next(iter(seen[6]["params"].values()))).all()  # not restored
    codes = [r["code"] for r in out["records"] if r["event"] == "alert"]
    assert codes == ["guard_rollback", "guard_exhausted"]
    exhausted = next(r for r in out["records"] if r.get("code") == "guard_exhausted")
    assert exhausted["severity"] == "critical" and "no longer intervenes" in exhausted["message"]


def test_guard_needs_trainable_parameters() -> None:
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(UsageError, match="trainable"):
        Guard(model, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))


# --- a real tiny Trainer run ----------------------------------------------------------------

transformers = pytest.importorskip("transformers")

from gradience_hf import GradienceCallback  # noqa: E402
from tests.tiny_trainer import tiny_trainer  # noqa: E402


class _Spy(transformers.TrainerCallback):  # type: ignore[misc]
    """After the guard (it runs later in the list): copies of the weights and optimizer state."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, Any]] = {}

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                          **kw: Any) -> None:  # fmt: skip
        self.seen[state.global_step + 1] = {"params": _trainable(model), "opt": _clone(optimizer.state_dict())}


def _faulty(factors: dict[int, float]) -> Any:
    """A Trainer whose loss is multiplied by `factors[step]` at that optimizer step (1-based)."""

    class Faulty(transformers.Trainer):  # type: ignore[misc]
        def compute_loss(self, model: Any, inputs: Any, *a: Any, **kw: Any) -> Any:
            loss = super().compute_loss(model, inputs, *a, **kw)
            factor = factors.get(self.state.global_step + 1)
            return loss if factor is None else loss * factor

    return Faulty


def _run_trainer(tmp: Path, guard: Any, factors: dict[int, float], max_steps: int) -> dict[str, Any]:
    cb, spy = GradienceCallback(tmp / "log", structural_interval=0, guard=guard), _Spy()
    trainer = tiny_trainer(tmp, [cb, spy], max_steps=max_steps)
    trainer.__class__ = _faulty(factors)
    state = trainer.train()
    return {"spy": spy.seen, "records": _records(tmp / "log" / "run.jsonl"), "trainer": trainer, "state": state,
            "cb": cb}  # fmt: skip


def test_trainer_rollbacks_on_nan_and_on_a_spike_hidden_by_clipping(tmp_path: Path) -> None:
    cfg = GuardConfig(snapshot_every=3, cooldown=2, min_history=3, max_rollbacks=5)
    out = _run_trainer(tmp_path, cfg, {5: NAN, 10: 1e4}, 12)
    seen = out["spy"]
    assert out["trainer"].args.max_grad_norm == 1.0  # the spike's post-clip norm is at most 1
    # snapshots at 0 and 3; NaN at 5 -> back to 3; cooldown pauses the snapshot due at 6; 8; spike at 10 -> 8
    for bad, good in ((5, 3), (10, 8)):
        _assert_same_state(seen[bad]["params"], seen[good]["params"])
        _assert_same_state(seen[bad]["opt"]["state"], seen[good]["opt"]["state"])
    alerts = [r for r in out["records"] if r["event"] == "alert" and r["code"].startswith("guard")]
    assert [(a["step"], a["reason"], a["restored_to_step"]) for a in alerts] == [
        (5, "nonfinite_grad_norm", 3), (10, "grad_norm_spike", 8)]
    assert alerts[1]["grad_norm"] > max(100.0, alerts[1]["threshold"])  # pre-clip, far above max_grad_norm
    assert out["state"].global_step == 12
    assert all(torch.isfinite(p).all() for p in out["trainer"].model.parameters())


def test_trainer_stops_past_max_rollbacks_with_the_last_good_weights(tmp_path: Path) -> None:
    cfg = GuardConfig(snapshot_every=2, cooldown=0, max_rollbacks=2)
    out = _run_trainer(tmp_path, cfg, {s: NAN for s in range(5, 13)}, 12)
    assert out["state"].global_step == 7  # rollbacks at 5 and 6, then stop at 7
    codes = [(r["step"], r["code"]) for r in out["records"] if r["event"] == "alert" and "guard" in r["code"]]
    assert codes == [(5, "guard_rollback"), (6, "guard_rollback"), (7, "guard_stop")]
    stop = out["records"][[r.get("code") for r in out["records"]].index("guard_stop")]
    assert stop["severity"] == "critical" and stop["restored_to_step"] == 4
    _assert_same_state(_trainable(out["trainer"].model), out["spy"][4]["params"])
    assert out["records"][-1]["event"] == "run_end"


def test_guard_is_off_by_default_and_a_healthy_guarded_run_trains_identically(tmp_path: Path) -> None:
    plain = _run_trainer(tmp_path / "plain", None, {}, 6)
    guarded = _run_trainer(tmp_path / "guarded", GuardConfig(snapshot_every=2), {}, 6)
    assert plain["cb"]._guard is None
    for p in plain["trainer"].model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)  # no hook was ever registered
    assert not [r for r in plain["records"] if r["event"] == "alert"]
    assert not [r for r in guarded["records"] if r["event"] == "alert"]
    _assert_same_state(_trainable(plain["trainer"].model), _trainable(guarded["trainer"].model))
    _assert_same_state(plain["spy"][6]["opt"]["state"], guarded["spy"][6]["opt"]["state"])


def test_callback_rejects_a_bad_guard_argument(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="guard"):
        GradienceCallback(tmp_path, guard="yes")
