"""Pre-flight check of a LoRA config and its training arguments against a task profile.

`check(task, peft_dir, training_dir, model_config)` reads `adapter_config.json` (through
`gradience.lora.reader.load_settings`), a `training_args.json` snapshot and, when at hand, the
model's `config.json`, and returns a `CheckReport` of findings. The ranges are the task
profiles of `gradience.preflight.profiles`: commonly used values, so each finding is advice with
its rationale, not a verdict. Only errors (values PEFT or the optimizer cannot work with)
fail the check.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gradience.errors import UsageError
from gradience.lora.reader import (
    CONFIG_NAME,
    SAVED_PREFIX,
    LoraSettings,
    load_settings,
    module_type,
    pattern_key,
)
from gradience.lora.scale import lora_scale
from gradience.preflight.inputs import (
    TrainingSnapshot,
    finite_number,
    load_model_config,
    load_train_config,
    load_training_args,
    locate_file,
)
from gradience.preflight.profiles import (
    ModelInfo,
    Range,
    TaskProfile,
    matches_target,
    resolve_profile,
    valid_regex,
)

ABSURD_LEARNING_RATE = 1e-2
GENERATIVE_PROFILES = ("reasoning", "generation")  # tasks answered by generating text
_CLASSIFIER_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")
SEVERITIES = ("error", "warning", "info")
HEURISTICS_NOTE = (
    "These are heuristics to verify, not guarantees: the ranges are commonly used values, "
    "and only an eval on held-out data tells whether a config works for your task."
)


@dataclass(frozen=True)
class Finding:
    """One piece of advice: which rule, how serious, on which field, what to change and why."""

    rule: str
    severity: str  # "error", "warning" or "info"
    field: str | None
    message: str
    rationale: str
    value: Any = None
    suggested: Any = None


@dataclass(frozen=True)
class CheckReport:
    """Everything `gradience check` prints; `to_dict()` is exactly what `--json` prints."""

    task: str
    profile: str
    adapter_config: str
    r: int
    lora_alpha: float | None  # None when not finite, as is scale
    scale: float | None  # alpha / r, or alpha / sqrt(r) with use_rslora
    use_rslora: bool
    use_dora: bool
    lora_dropout: float | None
    target_modules: Any
    training: TrainingSnapshot | None
    model_config: str | None
    model_type: str | None
    findings: tuple[Finding, ...]
    skipped: tuple[str, ...]  # checks that could not run, and why
    note: str = HEURISTICS_NOTE

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    @property
    def ok(self) -> bool:
        """True when no finding is an error; warnings do not fail the check."""
        return self.count("error") == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(errors=self.count("error"), warnings=self.count("warning"), infos=self.count("info"), ok=self.ok)
        return d


def check(
    task: str, peft_dir: str | Path | None = None, training_dir: str | Path | None = None,
    model_config: str | Path | None = None, config: str | Path | None = None,
) -> CheckReport:
    """Check a PEFT LoRA config and its training arguments against a task profile.

    Args:
        task: A profile name or alias (`classification`, `sst2`, `gsm8k`, `chat`, ...).
        peft_dir: Folder holding `adapter_config.json`, or that file.
        training_dir: Folder holding `training_args.json`, or that file; None skips the training rules.
        model_config: The model's `config.json` (file or folder); by default a `config.json` found in
            `training_dir` or `peft_dir`; without one, the module-name rules are skipped.
        config: A TRL / axolotl training config (YAML or JSON) read before any training: the
            LoRA settings and training arguments come from it where `peft_dir` / `training_dir`
            are not given (`inputs.load_train_config`).

    Returns:
        A `CheckReport`; `report.ok` is False when any finding is an error.

    Raises:
        UsageError: an unknown task, a missing folder or file, a file that is not a JSON object.
        AdapterError: an `adapter_config.json` that is not a valid LoRA config.

    Example:
        >>> report = check("sst2", "runs/toy/peft", "runs/toy/training")  # doctest: +SKIP
        >>> [f.rule for f in report.findings if f.severity == "error"]      # doctest: +SKIP
    """
    profile = resolve_profile(task)
    train_config = load_train_config(config) if config is not None else None
    if peft_dir is not None:
        config_path = str(locate_file(Path(peft_dir), CONFIG_NAME, "adapter config"))
        settings = load_settings(Path(config_path), lint=True)  # faults PEFT refuses become findings
    elif train_config is not None and train_config.adapter_config is not None:
        config_path = train_config.path
        settings = LoraSettings.from_dict(train_config.adapter_config, source=config_path, lint=True)
    elif train_config is not None:
        raise UsageError(f"{train_config.path}: no LoRA settings (lora_r, lora_alpha, lora_target_modules or a "
                         "peft_config mapping); add them or pass --peft-dir")
    else:
        raise UsageError("nothing to check: pass --peft-dir (an adapter folder) or --config (a training config)")
    training = load_training_args(training_dir) if training_dir is not None else None
    if training is None and train_config is not None:
        training = train_config.training
    search = [d for d in (training_dir, peft_dir) if d is not None]
    if config is not None:
        search.append(Path(config).parent)
    model = load_model_config(model_config, search)
    skipped: list[str] = []  # the rules append what they could not check
    findings = [
        *_task_model_findings(settings, profile, model),
        *_lora_findings(settings, profile),
        *_target_findings(settings, profile, model, skipped),
        *_pattern_findings(settings, model, skipped),
        *(_training_findings(training, profile, skipped) if training else ()),
    ]
    if training is None:
        skipped.append("training arguments: no training dir given")
    return CheckReport(
        task=task, profile=profile.name, adapter_config=config_path, r=settings.r,
        lora_alpha=finite_number(settings.lora_alpha), scale=finite_number(_scale(settings, settings.r, settings.lora_alpha)),
        use_rslora=settings.use_rslora, use_dora=settings.use_dora,
        lora_dropout=finite_number(settings.raw.get("lora_dropout")), target_modules=settings.target_modules,
        training=training, model_config=model.path if model else None,
        model_type=model.model_type if model else None,
        findings=tuple(sorted(findings, key=lambda f: SEVERITIES.index(f.severity))), skipped=tuple(skipped),
    )


# --- rules --------------------------------------------------------------------------------------


def _scale(s: LoraSettings, r: int, alpha: float) -> float:
    return lora_scale(alpha, r, s.use_rslora)


def format_number(x: float) -> str:
    """Short and exact enough for advice: 0.002, 5e-5, 16, 0.333."""
    if x != 0 and abs(x) < 1e-3:
        mantissa, exponent = f"{x:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{x:.4g}"


def _outside(rule: str, fld: str, value: float, rng: Range, label: str, suggested: Any = None) -> list[Finding]:
    """A finding when `value` is outside `rng`; severity from the range, its typical value suggested."""
    if rng.low <= value <= rng.high:
        return []
    low = value < rng.low
    return [Finding(
        f"{rule}_{'too_low' if low else 'too_high'}", rng.below if low else rng.above, fld,
        f"{label} = {format_number(value)} is {'below' if low else 'above'} the profile's {format_number(rng.low)}–{format_number(rng.high)}",
        rng.rationale, value, rng.typical if suggested is None else suggested,
    )]


def _grouped(base: str, base_value: Any, pattern: Mapping[str, Any]) -> dict[Any, str]:
    """Field names grouped by value (`base` first), so 40 per-module keys give one finding, not 40."""
    groups: dict[Any, list[str]] = {base_value: [base]}
    for key, value in pattern.items():
        groups.setdefault(value, []).append(key)
    return {v: ", ".join(f[:3]) + (f" and {len(f) - 3} more" if len(f) > 3 else "") for v, f in groups.items()}


def _task_model_findings(s: LoraSettings, p: TaskProfile, model: ModelInfo | None) -> Iterator[Finding]:
    """The task against the model: a classification head cannot answer a generative task."""
    task_type = s.raw.get("task_type")
    task_type = task_type if isinstance(task_type, str) else None
    archs = model.architectures if model is not None else ()
    head = next((a for a in archs if a.endswith(("ForSequenceClassification", "ForTokenClassification"))), None)
    if p.name in GENERATIVE_PROFILES and (task_type in _CLASSIFIER_TASK_TYPES or head):
        what = f"task_type {task_type}" if task_type in _CLASSIFIER_TASK_TYPES else f"architecture {head}"
        yield Finding("task_model_mismatch", "error", "task_type", f"the {p.name} profile generates text, but the "
                      f"model is a classifier ({what})", "A classification head outputs label scores, not tokens: "
                      "a generative task needs a causal LM (task_type CAUSAL_LM, a *ForCausalLM model).",
                      task_type or head, "CAUSAL_LM")
    elif p.name == "classification" and (task_type == "CAUSAL_LM" or any(a.endswith("ForCausalLM") for a in archs)):
        yield Finding("task_model_mismatch", "info", "task_type", "a classification task on a causal LM: labels "
                      "are generated as text", "That works (and monitor then reports exact match, not chance "
                      "levels); a SEQ_CLS head is cheaper when the labels are fixed.", task_type, "SEQ_CLS")


def _lora_findings(s: LoraSettings, p: TaskProfile) -> Iterator[Finding]:
    for r, fld in _grouped("r", s.r, {f"rank_pattern[{k!r}]": v for k, v in s.rank_pattern.items()}).items():
        if r < 1:
            yield Finding("rank_invalid", "error", fld, f"{fld} = {r}: a LoRA rank must be at least 1",
                          "PEFT cannot build a rank-0 adapter.", r, p.rank.typical)
        else:
            yield from _outside("rank", fld, r, p.rank, fld)
    # every (r, alpha) pair PEFT will apply: the global pair and each pattern key's
    pairs = {f"pattern[{k!r}]": (s.rank_pattern.get(k, s.r), s.alpha_pattern.get(k, s.lora_alpha))
             for k in {**s.rank_pattern, **s.alpha_pattern}}
    kind = "alpha/sqrt(r)" if s.use_rslora else "alpha/r"
    for (r, alpha), fld in _grouped("lora_alpha", (s.r, s.lora_alpha), pairs).items():
        if r < 1:
            continue
        scale, label = _scale(s, r, alpha), f"effective scale {kind} with r={r}, alpha={format_number(alpha)} ({fld})"
        better = round((p.scale.typical or 1.0) * (math.sqrt(r) if s.use_rslora else r), 2)  # lora_alpha
        if not scale > 0 or not math.isfinite(scale):
            yield Finding("scale_invalid", "error", fld, f"{label} = {scale}: the update is zero, flipped or infinite",
                          "lora_alpha must be positive for the adapter to learn anything.", scale, better)
        else:
            yield from _outside("scale", fld, scale, p.scale, label, suggested=better)
    if s.use_rslora:
        yield Finding("rslora", "info", "use_rslora", f"rsLoRA is on: the scale is alpha/sqrt(r) = "
                      f"{format_number(_scale(s, s.r, s.lora_alpha))}, not alpha/r", "rsLoRA (Kalajdzievski, 2023) keeps the "
                      "update's size stable as r grows; compare learning rates with that scale in mind.", True)
    elif s.r >= 64:
        yield Finding("rslora_suggested", "info", "use_rslora", f"r={s.r} with alpha/r scaling", "At high rank "
                      "alpha/r shrinks the update and slows learning; rsLoRA (alpha/sqrt(r), Kalajdzievski "
                      "2023) was designed for ranks like this.", False, True)
    if s.use_dora:
        yield Finding("dora", "info", "use_dora", "DoRA is on: a learned magnitude vector per module", "DoRA "
                      "(Liu et al., 2024) often helps at low rank but costs extra compute per step; "
                      "`gradience audit` covers only its low-rank B·A part.", True)
    dropout = s.raw.get("lora_dropout", 0.0)
    if dropout is None:
        return
    if finite_number(dropout) is None or not 0 <= dropout < 1:
        yield Finding("dropout_invalid", "error", "lora_dropout", f"lora_dropout = {dropout!r} is not in [0, 1)",
                      "Dropout is a probability; 1 would drop every LoRA input.", dropout, p.lora_dropout.typical)
    else:
        yield from _outside("dropout", "lora_dropout", dropout, p.lora_dropout, "lora_dropout")


def _target_findings(s: LoraSettings, p: TaskProfile, model: ModelInfo | None, skipped: list[str]) -> Iterator[Finding]:
    targets = s.target_modules
    if not targets:
        skipped.append("target modules: adapter_config.json names none (PEFT then uses its per-model default)")
        return
    if not isinstance(targets, (str, list, tuple)) or (isinstance(targets, str) and targets != "all-linear"
                                                      and not valid_regex(targets)):
        yield Finding("target_modules_invalid", "error", "target_modules", f"target_modules {targets!r} is neither a "
                      "list of names nor a valid regular expression", "PEFT matches a list entry as a module path "
                      "suffix and a string as a regex against every module path.", targets)
        return
    targets = targets if isinstance(targets, str) else [str(t) for t in targets]
    names = model.module_types if model else None
    types: set[str] | None = None
    if targets == "all-linear":
        types = {"attn", "mlp"}
    elif names is not None:
        types = {t for n, t in names.items() if matches_target(targets, n)}
        entries = [targets] if isinstance(targets, str) else [[t] for t in targets]
        missing = [e if isinstance(e, str) else e[0] for e in entries if not any(matches_target(e, n) for n in names)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, t in names.items() if t in ("attn", "mlp")})
            yield Finding("targets_not_in_model", "error" if len(missing) == len(entries) else "warning",
                          "target_modules", f"no module of a {model.model_type if model else ''} model matches "
                          f"target_modules {', '.join(map(repr, missing))}", "PEFT refuses a config whose targets "
                          "match nothing, and silently ignores the entries that match nothing.", missing, leaves)
    elif not isinstance(targets, str):
        types = {module_type(t) for t in targets}
    if names is None:
        why = "no config.json given or found" if model is None else f"no known naming for model_type {model.model_type!r}"
        skipped.append(f"target modules exist in the model: {why} (pass --model-config)")
    if types is None:
        skipped.append("attention vs MLP targets: a regex target_modules needs the model's module names")
    elif p.mlp_targets and "attn" in types and "mlp" not in types:
        yield Finding("attention_only", "warning", "target_modules", f"only attention modules are targeted; the "
                      f"{p.name} profile recommends attention and MLP", p.mlp_rationale, targets, "all-linear")
    elif not p.mlp_targets and "mlp" in types:
        yield Finding("mlp_targets", "info", "target_modules", f"MLP modules are targeted; attention-only is "
                      f"usually enough for {p.name}", p.mlp_rationale, targets)


def _targeted(targets: Any, module_types: Mapping[str, str]) -> list[str]:
    """The module paths PEFT will adapt; every path when the targets are unusable or match nothing."""
    if targets == "all-linear":  # PEFT: every linear layer but the output head
        return [n for n, kind in module_types.items() if kind in ("attn", "mlp", "other")]
    if isinstance(targets, (list, tuple)) or (isinstance(targets, str) and valid_regex(targets)):
        targets = targets if isinstance(targets, str) else [str(t) for t in targets]
        return [n for n in module_types if matches_target(targets, n)] or list(module_types)
    return list(module_types)


def _pattern_findings(s: LoraSettings, model: ModelInfo | None, skipped: list[str]) -> Iterator[Finding]:
    names = None  # the modules PEFT will adapt, when the model's naming and depth are known
    if model is not None and model.module_types is not None and model.n_layers:
        names = _targeted(s.target_modules, model.module_types)
    for label, pattern in (("rank_pattern", s.rank_pattern), ("alpha_pattern", s.alpha_pattern)):
        if pattern and names is None:
            skipped.append(f"{label} keys match modules: the model's module names (and layer count) are not known")
        for key in pattern:
            fld = f"{label}[{key!r}]"
            if not key or not valid_regex(key):
                yield Finding("pattern_invalid_regex", "error", fld, f"{label} key {key!r} is not a valid regular "
                              "expression", "PEFT matches each key as a regex against the end of the module path.", key)
            elif key.startswith(SAVED_PREFIX):
                yield Finding("pattern_malformed", "warning", fld, f"{label} key {key!r} starts with the saved-"
                              f"weights prefix {SAVED_PREFIX!r}", "PEFT matches keys against the base model's module "
                              "paths, which do not carry that prefix.", key, key.removeprefix(SAVED_PREFIX))
            elif names is not None and not any(pattern_key([key], n) for n in names):
                yield Finding("pattern_unmatched", "warning", fld, f"{label} key {key!r} matches no targeted module",
                              "A key that matches nothing is silently ignored, so those modules keep the global "
                              "value: probably a typo, or another model's naming.", key)


def _training_findings(t: TrainingSnapshot, p: TaskProfile, skipped: list[str]) -> Iterator[Finding]:
    lr = t.learning_rate
    if lr is None:
        skipped.append("learning rate: no numeric learning_rate in the training arguments")
    elif lr <= 0 or lr > ABSURD_LEARNING_RATE:
        yield Finding("learning_rate_absurd", "error", "learning_rate", f"learning_rate = {format_number(lr)} is "
                      f"{'not positive' if lr <= 0 else f'above {format_number(ABSURD_LEARNING_RATE)}'}",
                      "No LoRA setup trains stably at such a rate. " + p.learning_rate.rationale, lr,
                      p.learning_rate.typical)
    else:
        yield from _outside("learning_rate", "learning_rate", lr, p.learning_rate, "learning_rate")
    if t.total_steps is not None:
        yield from _outside("steps", "max_steps", t.total_steps, p.steps, "total optimizer steps")
    else:
        skipped.append("total steps: set by epochs and dataset size, which the snapshot does not give")
    if (t.max_steps or 0) <= 0 and t.num_train_epochs is not None:  # max_steps > 0 overrides epochs
        yield from _outside("epochs", "num_train_epochs", t.num_train_epochs, p.epochs, "num_train_epochs")
    if t.effective_batch_size is None:
        skipped.append("batch size: no per_device_train_batch_size in the training arguments")
    else:
        world = f"world size {t.world_size}" if t.world_size else "world size unknown, taken as 1"
        label = (f"effective batch ({t.per_device_train_batch_size} per device × "
                 f"{t.gradient_accumulation_steps or 1} accumulation, {world})")
        yield from _outside("batch_size", "per_device_train_batch_size", t.effective_batch_size, p.batch_size, label)
