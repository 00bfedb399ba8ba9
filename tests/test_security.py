"""Security: no pickle code execution, secrets and long text redacted, no paths or host names."""

from __future__ import annotations

import json
import pickle
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from gradience.errors import AdapterError
from gradience.telemetry import RunWriter, is_secret_key, sanitize

SRC = Path(__file__).resolve().parents[1] / "src" / "gradience"

# --- (a) no pickle loading without an explicit opt-in ---------------------------------------


class _Payload:
    """Unpickling this writes a marker file: what a malicious `.bin` would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_source_never_loads_pickles_unsafely() -> None:
    calls = re.compile(r"torch\.load\((?P<args>[^)]*)\)")
    for path in SRC.rglob("*.py"):
        text = path.read_text("utf-8")
        for m in calls.finditer(text):
            assert "weights_only=True" in m.group("args"), f"{path}: {m.group(0)}"
        for banned in ("pickle.load", "import pickle", "allow_pickle=True", "joblib", "dill", "yaml.load("):
            assert banned not in text, f"{path} uses {banned}"


@pytest.fixture
def evil_bin(tmp_path: Path) -> tuple[Path, Path]:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "marker.txt"
    path = tmp_path / "adapter" / "adapter_model.bin"
    path.parent.mkdir()
    torch.save({"base_model.model.q.lora_A.weight": torch.ones(2, 4), "x": _Payload(marker)}, path)
    return path, marker


def test_malicious_bin_is_refused_and_never_runs(evil_bin: tuple[Path, Path]) -> None:
    from gradience.lora.safetensors_file import TensorFile

    path, marker = evil_bin
    with pytest.raises(AdapterError, match="weights_only"):
        TensorFile(path)
    assert not marker.exists()


def test_malicious_raw_pickle_named_bin_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from gradience.lora.safetensors_file import TensorFile

    marker = tmp_path / "marker.txt"
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=2))  # legacy (non-zip) pickle
    with pytest.raises(AdapterError):
        TensorFile(path)
    assert not marker.exists()


def test_malicious_bin_in_an_adapter_folder_is_refused_by_audit(evil_bin: tuple[Path, Path]) -> None:
    from gradience.mechanic.audit import audit

    path, marker = evil_bin
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q"]}
    (path.parent / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError):
        audit(path.parent)
    assert not marker.exists()


def test_peft_loading_the_same_file_is_weights_only_too(evil_bin: tuple[Path, Path]) -> None:
    """`evaluate_adapter` hands adapter folders to PEFT; PEFT loads `.bin` weights-only."""
    peft_utils = pytest.importorskip("peft.utils")
    path, marker = evil_bin
    with pytest.raises(Exception, match=r"(?i)weights.only|unpickl"):
        peft_utils.load_peft_weights(str(path.parent), device="cpu")
    assert not marker.exists()


def test_the_payload_is_live_when_unpickled_unsafely(evil_bin: tuple[Path, Path]) -> None:
    """The control: the refusals above are what kept the marker from appearing."""
    import torch

    path, marker = evil_bin
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


# --- (b) redaction by key and by length -----------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["HF_TOKEN", "hub_token", "api_key", "API_KEY", "password", "wandb_api_key", "WANDB_API_KEY",
     "openaiApiKey", "aws_secret_access_key", "db-password", "Bearer_Token"],
)  # fmt: skip
def test_secret_keys_are_redacted_at_any_depth(key: str) -> None:
    assert is_secret_key(key)
    record = {
        key: "s3cr3t",
        "env": {key: "s3cr3t", "runs": [{"cfg": {key: "s3cr3t"}}, [{key: ["s3cr3t"]}]]},
        "nested": {key: {"inner": "s3cr3t"}},
    }
    for raw, paths in ((False, False), (True, True)):  # the opt-ins never reveal secrets
        out = sanitize(record, allow_raw_text=raw, record_paths=paths)
        assert "s3cr3t" not in json.dumps(out)
        assert out[key] == out["env"][key] == out["nested"][key] == "<redacted>"
        assert out["env"]["runs"][0]["cfg"][key] == out["env"]["runs"][1][0][key] == "<redacted>"


def test_a_secret_key_with_no_value_stays_null() -> None:
    assert sanitize({"hf_token": None}) == {"hf_token": None}


@pytest.mark.parametrize("n", [255, 256, 257, 10_000])
def test_length_redaction_boundary_in_nested_values(tmp_path: Path, n: int) -> None:
    text = "a" * n
    record = {"prompt": text, "history": [{"turn": [text]}], "meta": {"deep": {"deeper": text}}}
    expected = text if n <= 256 else f"<redacted: {n} chars>"
    out = sanitize(record)
    assert out["prompt"] == out["history"][0]["turn"][0] == out["meta"]["deep"]["deeper"] == expected
    assert sanitize(record, allow_raw_text=True)["meta"]["deep"]["deeper"] == text
    with RunWriter(tmp_path / "run.jsonl") as w:  # the writer applies the same rule
        written = w.write("run_start", **record)
    assert written["history"][0]["turn"][0] == expected
    with RunWriter(tmp_path / "raw.jsonl", allow_raw_text=True) as w:
        assert w.write("run_start", **record)["history"][0]["turn"][0] == text


# --- (c) no host names or absolute paths in a real run's log unless asked ----------------------

HOST = "gpu-node-17.example.org"


def test_host_name_is_found_inside_underscored_run_names() -> None:
    hosts = [HOST, "gpu-node-17"]
    out = sanitize({"a": "runs/Nov23_12-00-00_gpu-node-17", "b": "gpu-node-170", "c": "on gpu-node-17."},
                   host_names=hosts)  # fmt: skip
    assert out == {"a": "runs/Nov23_12-00-00_<host>", "b": "gpu-node-170", "c": "on <host>."}


def _tiny_run(tmp: Path, monkeypatch: pytest.MonkeyPatch, **cb_kw: Any) -> str:
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from gradience_hf import GradienceCallback
    from tests.tiny_trainer import tiny_trainer

    monkeypatch.setattr(socket, "gethostname", lambda: HOST)
    cb = GradienceCallback(tmp / "log", structural_interval=2, **cb_kw)
    # `runs/<date>_<host>` is what older transformers defaulted `logging_dir` / `run_name` to
    trainer = tiny_trainer(tmp, [cb], max_steps=2, run_name=f"runs/Nov23_12-00-00_{HOST.split('.')[0]}",
                           hub_token="hf_abcdefghijklmnopqrstuvwxyz", eval_strategy="steps", eval_steps=2)
    trainer.model.base_model.model.config.name_or_path = str(tmp / "models" / "my-bert")  # a local checkpoint
    trainer.train()
    text = (tmp / "log" / "run.jsonl").read_text("utf-8")
    assert transformers is not None and text
    return text


def test_a_trainer_run_log_holds_no_host_name_or_absolute_path(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    text = _tiny_run(tmp_path, monkeypatch)
    assert HOST not in text and HOST.split(".")[0] not in text
    assert str(tmp_path) not in text and str(tmp_path.parent) not in text
    assert "hf_abcdefghijklmnopqrstuvwxyz" not in text
    start = json.loads(text.splitlines()[0])
    assert start["training_args"]["output_dir"] == "hf"
    assert start["training_args"]["run_name"] == "runs/Nov23_12-00-00_<host>"
    assert start["model"]["name"] == "my-bert"
    for line in text.splitlines():  # no string value anywhere looks like an absolute path
        for value in _strings(json.loads(line)):
            assert not value.startswith(("/", "~/")), value


def test_record_paths_keeps_them_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _tiny_run(tmp_path, monkeypatch, record_paths=True)
    start = json.loads(text.splitlines()[0])
    assert start["training_args"]["output_dir"] == str(tmp_path / "hf")
    assert start["model"]["name"] == str(tmp_path / "models" / "my-bert")
    assert HOST.split(".")[0] in start["training_args"]["run_name"]


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []
