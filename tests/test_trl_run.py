"""A causal LM fine-tuned through TRL's SFTTrainer, observed end to end.

One real run (a tiny random Llama, a word-level tokenizer built here, generated sums) feeds
every assertion: what the log holds, what `gradience monitor` and `gradience check` print.
Each test names the finding of issue 10 it would have caught.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from gradience.telemetry import iter_records  # noqa: E402
from gradience_hf import GradienceCallback  # noqa: E402

GRADIENCE = str(Path(sys.executable).parent / "gradience")
HUB_ID = "acme/tiny-llama"
MAX_GRAD_NORM = 1e-3  # far below the pre-clip norm: every logged step is clipped
WORDS = ["<pad>", "<eos>", "<unk>", "what", "is", "plus", "?", "answer", ":"] + [str(i) for i in range(41)]


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")  # fmt: skip


def _rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"prompt": f"what is {a} plus {b} ? answer :", "completion": f" {a + b}"})
    return rows


def _local_model(folder: Path) -> Path:
    """A tiny random Llama saved in a local folder whose config names a hub id."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=1)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": HUB_ID}))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from datasets import Dataset

    tmp = tmp_path_factory.mktemp("trl")
    model_dir = _local_model(tmp / "tiny-llama")
    out = tmp / "run"
    tokenizer = _tokenizer()
    config = trl.SFTConfig(
        output_dir=str(out / "hf"), max_steps=8, num_train_epochs=3, per_device_train_batch_size=8,
        learning_rate=5e-2, logging_steps=2, eval_strategy="steps", eval_steps=4, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, max_length=32, max_grad_norm=MAX_GRAD_NORM,
        gradient_checkpointing=False, hub_token="hf_" + "x" * 34,
    )
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    callback = GradienceCallback(out, structural_interval=2, check_task="gsm8k")
    trainer = trl.SFTTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(model_dir), args=config,
        train_dataset=Dataset.from_list(_rows(96, 0)), eval_dataset=Dataset.from_list(_rows(16, 1)),
        processing_class=tokenizer, peft_config=lora, callbacks=[callback],
    )
    trainer.train()
    trainer.model.save_pretrained(out / "peft")
    records = [r.data for r in iter_records(out / "run.jsonl")]
    return {"out": out, "records": records, "trainer": trainer}


def _of(records: list[dict[str, Any]], event: str, **match: Any) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == event and all(r.get(k) == v for k, v in match.items())]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRADIENCE, *args], capture_output=True, text=True, timeout=120, check=False)


# -- finding 1: TRL's metric names are metrics, not secrets ---------------------------------------


def test_trl_eval_metrics_are_not_redacted(run: dict[str, Any]) -> None:
    evals = _of(run["records"], "eval")
    assert [e["step"] for e in evals] == [4, 8] and {e["split"] for e in evals} == {"eval"}
    for e in evals:
        m = e["metrics"]
        for key in ("loss", "mean_token_accuracy", "num_tokens", "entropy"):
            assert isinstance(m[key], float | int) and not isinstance(m[key], bool), (key, m)
        assert 0.0 <= m["mean_token_accuracy"] <= 1.0
        assert m["ppl"] == pytest.approx(math.exp(m["loss"]))
    assert "<redacted>" not in json.dumps(evals)


def test_real_secrets_in_the_arguments_stay_redacted(run: dict[str, Any]) -> None:
    start = _of(run["records"], "run_start")[0]
    assert start["training_args"]["hub_token"] == "<redacted>"
    written = (run["out"] / "training_args.json").read_text()
    assert "hf_xxxx" not in written and json.loads(written)["hub_token"] == "<redacted>"


# -- finding 2: every numeric train metric is kept -------------------------------------------------


def test_train_steps_keep_every_numeric_metric_trl_logs(run: dict[str, Any]) -> None:
    steps = _of(run["records"], "train_step")
    assert [s["step"] for s in steps] == [2, 4, 6, 8]
    for s in steps:
        for key in ("loss", "lr", "grad_norm", "epoch", "entropy", "num_tokens", "mean_token_accuracy"):
            assert isinstance(s[key], float | int), (key, s)
        assert not any(k.startswith("lora/") for k in s)  # the mirror is not logged back
    assert steps[-1]["num_tokens"] > steps[0]["num_tokens"]  # TRL's running token count


# -- finding 3 and task awareness: a causal LM is not judged as a classifier ------------------------


def test_run_start_records_the_task(run: dict[str, Any]) -> None:
    start = _of(run["records"], "run_start")[0]
    assert start["task"] == {"peft_task_type": "CAUSAL_LM", "model_class": "LlamaForCausalLM", "kind": "causal_lm"}
    assert start["model"]["name"] == "tiny-llama" and start["model"]["hub_id"] == HUB_ID


def test_monitor_reports_a_causal_lm_without_chance_talk(run: dict[str, Any]) -> None:
    proc = _cli("monitor", str(run["out"] / "run.jsonl"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    last = _of(run["records"], "eval")[-1]["metrics"]
    assert f"  Eval loss: {last['loss']:.4f}" in out
    assert "  Eval PPL (per token): " in out
    assert f"  Eval token accuracy: {100 * last['mean_token_accuracy']:.1f}%" in out
    for wrong in ("chance", "near_chance", "assumed binary", "Test PPL", "Test Acc", "Train Acc"):
        assert wrong not in out, wrong
    data = json.loads(_cli("monitor", "--json", str(run["out"] / "run.jsonl")).stdout)
    assert data["signals"]["chance"] is None and data["signals"]["task_kind"] == "causal_lm"
    assert "near_chance" not in [r["code"] for r in data["recommendations"]]


# -- finding 4: check runs on what the run leaves, and at train begin -------------------------------


def test_check_runs_on_the_callback_out_dir(run: dict[str, Any]) -> None:
    out = run["out"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    proc = _cli("check", "--task", "gsm8k", "--peft-dir", str(out / "peft"), "--training-dir", str(out), "--json")
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    assert report["training"]["path"] == str(out / "training_args.json")
    assert report["training"]["learning_rate"] == pytest.approx(5e-2) and report["training"]["max_steps"] == 8
    assert report["model_type"] == "llama" and report["model_config"] == str(out / "config.json")
    assert "task_model_mismatch" not in [f["rule"] for f in report["findings"]]


def test_check_task_logs_findings_at_train_begin(run: dict[str, Any]) -> None:
    found = [a for a in _of(run["records"], "alert") if a["code"].startswith("check_")]
    assert found and all(a["step"] == 0 and a["source"] == "check" for a in found)
    codes = {a["code"] for a in found}
    # lr 5e-2 is above any stable LoRA rate (an error); attention-only targets are flagged for gsm8k.
    assert "check_learning_rate_absurd" in codes and "check_attention_only" in codes
    cli = json.loads(_cli("check", "--task", "gsm8k", "--peft-dir", str(run["out"] / "peft"),
                          "--training-dir", str(run["out"]), "--json").stdout)  # fmt: skip
    assert codes == {f"check_{f['rule']}" for f in cli["findings"]}  # the same check, live and offline


# -- finding 5: lora_grad_norm is the pre-clip norm -----------------------------------------------


def test_lora_grad_norm_is_taken_before_clipping(run: dict[str, Any]) -> None:
    for s in _of(run["records"], "train_step"):
        # Only LoRA parameters train, so the pre-clip LoRA norm is the Trainer's pre-clip grad_norm;
        # a post-clip reading would be MAX_GRAD_NORM.
        assert s["grad_norm"] > 10 * MAX_GRAD_NORM
        assert s["lora_grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4)


# -- finding 6: monitor's numbers ------------------------------------------------------------------


def test_monitor_numbers_trend_cost_model_split_and_steps(run: dict[str, Any]) -> None:
    data = json.loads(_cli("monitor", "--json", str(run["out"] / "run.jsonl")).stdout)
    trend = data["train"]["loss_trend"]
    assert trend["relative_change"] is not None and -1.0 < trend["relative_change"] < 1.0
    costs = [r["cost_ms"] for r in _of(run["records"], "metrics", kind="structural") if "cost_ms" in r]
    st = data["structural"]
    assert st["cost_ms_median"] == pytest.approx(sorted(costs)[len(costs) // 2] if len(costs) % 2 else
                                                 sum(sorted(costs)[len(costs) // 2 - 1:][:2]) / 2)  # fmt: skip
    assert min(costs) <= st["cost_ms_median"] <= st["cost_ms_p95"] <= max(costs)
    args = data["run"]["training_args"]
    assert args["max_steps"] == 8 and "num_train_epochs" not in args
    text = _cli("monitor", "--verbose", str(run["out"] / "run.jsonl")).stdout
    assert "Model: tiny-llama (acme/tiny-llama)" in text
    assert "max_steps: 8" in text and "num_train_epochs" not in text


# -- structural snapshots in an LLM run -------------------------------------------------------------


def test_every_eval_has_a_same_step_eval_snapshot(run: dict[str, Any]) -> None:
    structural = _of(run["records"], "metrics", kind="structural")
    for e in _of(run["records"], "eval"):
        assert any(s["step"] == e["step"] and s["reason"] == "eval" for s in structural), e["step"]
    assert all(s["n_modules"] == 4 for s in structural)  # 2 layers x (q_proj, v_proj)
