"""One CLI grammar: every command takes its main input positionally, with one resolution rule
(a run folder means its run.jsonl; a folder with adapter_config.json is an adapter; a
.safetensors file is single-file mode), the old flag kept as an alias, the same hint for a
path that fits no rule, names checked with a did-you-mean, --top with totals, a description
on every --help. Real subprocesses of the console script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradience.cli import COMMANDS
from gradience.cli._inputs import check_names, resolve_adapter, resolve_log, top
from gradience.errors import UsageError
from tests.cli_helpers import assert_one_error_line
from tests.factories import AdapterSpec, ModuleSpec, write_adapter
from tests.test_monitor import write_run

GRADIENCE = str(Path(sys.executable).parent / "gradience")


def gradience(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRADIENCE, *map(str, args)], capture_output=True, text=True, timeout=300, check=False)


def ok_json(*args: str) -> dict:
    proc = gradience(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as the demo leaves it: run.jsonl, peft/, training/ (and a second adapter)."""
    run = tmp_path_factory.mktemp("run")
    modules = {f"model.layers.{i}.self_attn.{p}": ModuleSpec(24, 16, [3.0, 1.0, 0.2]) for i in range(12)
               for p in ("q_proj", "v_proj")}  # fmt: skip
    write_adapter(run / "peft", AdapterSpec(modules, r=4, lora_alpha=8))
    write_adapter(run / "other", AdapterSpec(modules, r=4, lora_alpha=8), seed=7)
    (run / "training").mkdir()
    (run / "training" / "training_args.json").write_text(json.dumps(
        {"learning_rate": 2e-4, "num_train_epochs": 3, "per_device_train_batch_size": 16}))  # fmt: skip
    write_run(run / "run.jsonl", every=10)
    return run


# -- the rule, as a library ------------------------------------------------------------------


def test_resolution_rule(run_dir: Path) -> None:
    assert resolve_log(run_dir) == str(run_dir / "run.jsonl")
    assert resolve_log(run_dir / "run.jsonl") == str(run_dir / "run.jsonl")
    assert resolve_adapter(run_dir / "peft").peft_dir == str(run_dir / "peft")
    assert resolve_adapter(run_dir / "peft" / "adapter_config.json").peft_dir == str(run_dir / "peft")
    single = resolve_adapter(run_dir / "peft" / "adapter_model.safetensors")
    assert (single.peft_dir, single.weights) == (None, str(run_dir / "peft" / "adapter_model.safetensors"))
    with pytest.raises(UsageError, match=rf"subfolder: pass {re.escape(str(run_dir / 'other'))}"):
        resolve_adapter(run_dir)  # a run folder: the hint names its adapter
    parent = _parent_of_runs(run_dir)
    with pytest.raises(UsageError, match=rf"without run.jsonl; pass {re.escape(str(parent / 'a' / 'run.jsonl'))}"):
        resolve_log(parent)
    with pytest.raises(UsageError, match="not found"):
        resolve_log(run_dir / "missing")


def _parent_of_runs(run_dir: Path) -> Path:
    """A folder whose run log sits one level down (a parent of run folders)."""
    parent = run_dir.parent / f"{run_dir.name}-parent"
    (parent / "a").mkdir(parents=True, exist_ok=True)
    (parent / "a" / "run.jsonl").write_bytes((run_dir / "run.jsonl").read_bytes())
    return parent


def test_check_names_offers_the_closest() -> None:
    assert check_names(["stable_rank"], ["stable_rank", "sigma_max"]) == ["stable_rank"]
    with pytest.raises(UsageError, match="unknown metric 'stable_rnak'; did you mean 'stable_rank'"):
        check_names(["stable_rnak"], ["stable_rank", "sigma_max"])
    assert top([1, 2, 3], 2) == ([1, 2], 1) and top([1, 2, 3], 0) == ([1, 2, 3], 0)


# -- every command, both spellings -------------------------------------------------------------


@pytest.mark.parametrize("command", ["audit", "check", "compress"])
def test_adapter_commands_take_the_adapter_positionally_or_as_peft_dir(run_dir: Path, tmp_path: Path,
                                                                      command: str) -> None:  # fmt: skip
    extra = {"audit": [], "check": ["--task", "sst2", "--training-dir", run_dir / "training"],
             "compress": ["--rank", "2", "--force"]}[command]  # fmt: skip
    out = {"compress": lambda tag: ["--out-dir", tmp_path / tag]}.get(command, lambda tag: [])
    positional = ok_json(command, run_dir / "peft", *extra, *out("a"))
    flagged = ok_json(command, "--peft-dir", run_dir / "peft", *extra, *out("b"))
    for d in (positional, flagged):  # paths differ only where the outputs went
        d.pop("out_dir", None)
    assert positional == flagged
    proc = gradience(command, run_dir, *extra, *out("c"))  # the run folder, not its adapter
    assert proc.returncode == 2
    assert_one_error_line(proc, "subfolder: pass", str(run_dir / "other"))
    proc = gradience(command, run_dir / "peft", "--peft-dir", run_dir / "other", *extra, *out("d"))
    assert proc.returncode == 2
    assert_one_error_line(proc, "two inputs given")


def test_audit_reads_a_single_safetensors_file(run_dir: Path) -> None:
    whole = ok_json("audit", run_dir / "peft")
    single = ok_json("audit", run_dir / "peft" / "adapter_model.safetensors")
    assert single["summary"] == whole["summary"] and single["peft_dir"] is None


@pytest.mark.parametrize("command", ["compare", "merge"])
def test_two_adapter_commands_resolve_both_and_list_the_top_modules(run_dir: Path, tmp_path: Path,
                                                                    command: str) -> None:  # fmt: skip
    out = ["--out-dir", tmp_path / "merged"] if command == "merge" else []
    proc = gradience(command, run_dir / "peft", run_dir / "other", *out, "--top", "5")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "model.layers." in line]
    assert len(rows) == 5 and "(24; " in proc.stdout and "top 5 shown; --top 0 for all" in proc.stdout
    proc = gradience(command, run_dir / "peft", run_dir / "other", *out, "--top", "0", *(["--force"] if out else []))
    assert len([line for line in proc.stdout.splitlines() if "model.layers." in line]) == 24
    proc = gradience(command, run_dir, run_dir / "other", *out)
    assert proc.returncode == 2
    assert_one_error_line(proc, "subfolder: pass")
    assert "--peft-dir" not in proc.stderr  # no hint of a flag these commands do not take


def test_compress_lists_the_top_modules_with_totals(run_dir: Path, tmp_path: Path) -> None:
    proc = gradience("compress", run_dir / "peft", "--out-dir", tmp_path / "c", "--rank", "2", "--top", "3")
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.startswith("  r ")]) == 3
    assert "Modules (24; largest error first, top 3 shown" in proc.stdout and "LoRA params:" in proc.stdout


@pytest.mark.parametrize("command", ["monitor", "analyze", "plot", "report"])
def test_log_commands_take_the_run_folder_or_its_log(run_dir: Path, tmp_path: Path, command: str) -> None:
    out = {"plot": lambda t: ["-o", tmp_path / f"{t}.png"], "report": lambda t: ["-o", tmp_path / f"{t}.html"]}
    o = out.get(command, lambda t: [])
    by_folder, by_file = ok_json(command, run_dir, *o("a")), ok_json(command, run_dir / "run.jsonl", *o("b"))
    for d in (by_folder, by_file):
        d.pop("out", None)
        d.pop("bytes", None)  # the report stamps its generation time
    assert by_folder == by_file
    proc = gradience(command, run_dir / "peft", *o("c"))
    assert proc.returncode == 2
    assert_one_error_line(proc, "a folder without run.jsonl")


@pytest.mark.parametrize("command", ["analyze", "plot"])
def test_unknown_metric_is_refused_with_a_did_you_mean(run_dir: Path, command: str) -> None:
    proc = gradience(command, run_dir, "--metrics", "frobenius_norm,stabel_rank")
    assert proc.returncode == 2
    assert_one_error_line(proc, "unknown structural metric 'stabel_rank'", "did you mean 'stable_rank'")


def test_explain_takes_the_audit_positionally_or_as_audit(run_dir: Path, tmp_path: Path) -> None:
    saved = tmp_path / "audit.json"
    saved.write_text(gradience("audit", run_dir / "peft", "--json", "--layers").stdout)
    module = "model.layers.0.self_attn.q_proj"
    assert ok_json("explain", saved, "--module", module) == ok_json("explain", "--audit", saved, "--module", module)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_page_has_a_description(command: str) -> None:
    proc = gradience(command, "--help")
    assert proc.returncode == 0
    # argparse prints: usage (until a blank line), the description, then the argument sections.
    after_usage = proc.stdout.split("\n\n", 1)[1]
    description = after_usage.split("\n\n", 1)[0].strip()
    assert description and not description.endswith(":"), proc.stdout[:400]
