"""What the callback records about the run's model and task, and `check` from the run itself.

`gradience check` judges a LoRA config against training arguments and the model's config.
A Trainer run holds all three in memory, so at train begin the callback writes the redacted
arguments and the base model's config into its out_dir (then `gradience check --peft-dir
ADAPTER --training-dir OUT_DIR` needs nothing hand-written) and, with `check_task`, runs the
check there and then, printing the findings and logging each as an `alert` record.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from gradience._io import write_json
from gradience.preflight.inputs import MODEL_CONFIG_NAME, TRAINING_ARGS_NAME
from gradience.telemetry.writer import sanitize

logger = logging.getLogger("gradience")

# PEFT task types and model-class suffixes -> the kind of task monitor reasons about.
_PEFT_KINDS = {
    "CAUSAL_LM": "causal_lm", "SEQ_CLS": "classification", "TOKEN_CLS": "token_classification",
    "SEQ_2_SEQ_LM": "seq2seq_lm", "QUESTION_ANS": "question_answering", "FEATURE_EXTRACTION": "feature_extraction",
}  # fmt: skip
_CLASS_KINDS = (
    ("ForCausalLM", "causal_lm"), ("ForSequenceClassification", "classification"),
    ("ForTokenClassification", "token_classification"), ("ForConditionalGeneration", "seq2seq_lm"),
    ("ForQuestionAnswering", "question_answering"),
)  # fmt: skip
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")


def is_hub_id(name: Any) -> bool:
    """True for `owner/name` (or a bare `name`) that is not a folder on this machine."""
    return isinstance(name, str) and _HUB_ID_RE.fullmatch(name) is not None and not Path(name).exists()


def model_identity(model: Any, explicit: str | None = None) -> dict[str, Any]:
    """`name` (a hub id as is; a local folder by its own name), `hub_id` and `class`.

    A local folder keeps its name, plus the hub id its `config.json` names in `_name_or_path`,
    so a model loaded from a cache folder still says what it is.
    """
    out: dict[str, Any] = {"class": type(model).__name__}
    source = getattr(getattr(model, "config", None), "name_or_path", None)
    if explicit:
        out["name"] = explicit
    elif isinstance(source, str) and source and Path(source).is_dir():
        out["name"] = Path(source).resolve().name
    elif isinstance(source, str) and source:
        out["name"] = source
    else:
        out["name"] = type(model).__name__
    if isinstance(source, str) and source and Path(source).is_dir():
        try:
            saved = json.loads((Path(source) / MODEL_CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = {}
        hub = saved.get("_name_or_path") if isinstance(saved, dict) else None
        if is_hub_id(hub):
            out["hub_id"] = hub
    elif is_hub_id(source):
        out["hub_id"] = source
    return out


def task_of(peft_model: Any, model: Any) -> dict[str, Any]:
    """The run's task: PEFT `task_type`, the model class, the kind, a classifier's label count."""
    configs = getattr(peft_model, "peft_config", None) or {}
    active = getattr(peft_model, "active_adapter", None)
    cfg = configs.get(active) if isinstance(configs, dict) and isinstance(active, str) else None
    cfg = cfg or (next(iter(configs.values())) if isinstance(configs, dict) and configs else None)
    task_type = getattr(cfg, "task_type", None)
    task_type = str(getattr(task_type, "value", task_type)) if task_type is not None else None
    cls = type(model).__name__
    kind = _PEFT_KINDS.get(task_type or "")
    if kind is None:
        kind = next((k for suffix, k in _CLASS_KINDS if cls.endswith(suffix)), None)
    out: dict[str, Any] = {"peft_task_type": task_type, "model_class": cls, "kind": kind}
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    if kind in ("classification", "token_classification") and isinstance(labels, int):
        out["num_labels"] = labels
    return out


def _config_dict(config: Any) -> dict[str, Any] | None:
    to_json = getattr(config, "to_json_string", None)
    if not callable(to_json):
        return None
    data = json.loads(to_json(use_diff=False))
    return data if isinstance(data, dict) else None


def write_check_inputs(out_dir: Path, training_args: dict[str, Any], config: Any, record_paths: bool = False) -> None:
    """`training_args.json` (redacted as the log is) and the base model's `config.json` in `out_dir`."""
    from gradience.telemetry.writer import local_host_names

    hosts = [] if record_paths else local_host_names()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / TRAINING_ARGS_NAME, sanitize(training_args, record_paths=record_paths, host_names=hosts))
    data = _config_dict(config)
    if data is not None:
        write_json(out_dir / MODEL_CONFIG_NAME, sanitize(data, record_paths=record_paths, host_names=hosts))


def run_check(task: str, peft_model: Any, recorder: Any, step: int = 0) -> Any:
    """`check(task)` on the live run's LoRA config and the files `write_check_inputs` wrote.

    Prints the findings (logger `gradience`) and logs each as an `alert` record with code
    `check_<rule>`; returns the `CheckReport`, or None when the model has no LoRA config.
    """
    from gradience.preflight.check import check

    configs = getattr(peft_model, "peft_config", None) or {}
    active = getattr(peft_model, "active_adapter", None)
    cfg = configs.get(active) if isinstance(active, str) else None
    cfg = cfg or (next(iter(configs.values())) if configs else None)
    if cfg is None:
        return None
    out_dir = Path(recorder.out_dir)
    with tempfile.TemporaryDirectory(prefix="gradience-check-") as tmp:
        cfg.save_pretrained(tmp)
        report = check(task, tmp, training_dir=out_dir, model_config=out_dir / MODEL_CONFIG_NAME)
    lines = [f"gradience check --task {task} (profile {report.profile}): "
             f"{report.count('error')} error(s), {report.count('warning')} warning(s)"]
    for f in report.findings:
        lines.append(f"  [{f.severity}] {f.rule}: {f.message}")
        recorder.alert(step, f"check_{f.rule}", f.message, severity=f.severity, source="check", field=f.field,
                       value=f.value, suggested=f.suggested, rationale=f.rationale)
    logger.warning("\n".join(lines))
    return report
