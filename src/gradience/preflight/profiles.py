"""Task profiles and model module naming for `gradience check`.

A profile is a set of commonly used LoRA ranges for one kind of task. The ranges are
deliberately wide: a value outside them is worth a second look, not necessarily wrong.

| profile          | r      | scale¹   | learning rate | dropout  | epochs² | steps³   | eff. batch | MLP targets |
|------------------|--------|----------|---------------|----------|---------|----------|------------|-------------|
| `classification` | 4–16   | 0.5–4    | 1e-4–3e-3     | 0–0.2    | 1–20    | ≥ 100    | 8–256      | optional    |
| `reasoning`      | 8–64   | 0.25–4   | 3e-5–5e-4     | 0–0.1    | 1–5     | ≥ 200    | 8–128      | recommended |
| `generation`     | 8–64   | 0.25–4   | 5e-5–5e-4     | 0–0.1    | 1–5     | ≥ 200    | 8–256      | recommended |

¹ effective scale: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`.
² checked when `max_steps` does not override epochs. ³ optimizer steps, when known.

Aliases (`sst2`, `gsm8k`, `chat`, ...) map dataset and task names onto the three profiles.
`MODEL_NAMING` maps a Hugging Face `model_type` to the module paths of its linear layers,
so that `target_modules` and `rank_pattern` keys can be checked before loading the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gradience.errors import UsageError


@dataclass(frozen=True)
class Range:
    """A recommended interval, a typical value to suggest, and why."""

    low: float
    high: float
    typical: float | None
    rationale: str
    below: str = "warning"  # severity of a value under `low`
    above: str = "warning"  # severity of a value over `high`


@dataclass(frozen=True)
class TaskProfile:
    name: str
    description: str
    rank: Range
    scale: Range
    learning_rate: Range
    lora_dropout: Range
    epochs: Range
    steps: Range
    batch_size: Range
    mlp_targets: bool  # whether adapting the MLP as well as attention is recommended
    mlp_rationale: str
    aliases: tuple[str, ...] = field(default=())


_SCALE_WHY = (
    "The update is multiplied by this scale, so it acts as a learning-rate multiplier: alpha = r "
    "to 2r (scale 1–2) is the common choice, and QLoRA's r=64, alpha=16 (0.25) is about the low end."
)
_DROPOUT_LLM = (
    "QLoRA used 0.05–0.1 and PEFT defaults to 0; more dropout mostly slows learning on the "
    "small, low-rank update."
)
_STEPS_WHY = (
    "lora_B starts at zero, so the adapter needs a few hundred optimizer steps to move; "
    "very long runs are fine with an eval set, but plan early stopping on it."
)
_ALL_LINEAR = (
    "Adapting every linear layer (attention and MLP) is what matched full fine-tuning in QLoRA "
    "(Dettmers et al., 2023) and on math and code in 'LoRA Learns Less and Forgets Less' "
    "(Biderman et al., 2024); attention-only adapters lag on these tasks."
)

PROFILES: dict[str, TaskProfile] = {
    p.name: p
    for p in (
        TaskProfile(
            name="classification",
            description="sentence or pair classification, label-level outputs (GLUE, sentiment)",
            rank=Range(4, 16, 8, "Hu et al. (2021) matched full fine-tuning on GLUE with r=8; label-level "
                       "tasks rarely use more rank (run `gradience audit` after training to see how much is used).",
                       below="info"),
            scale=Range(0.5, 4, 2, _SCALE_WHY),
            learning_rate=Range(1e-4, 3e-3, 5e-4, "LoRA on small encoders tolerates ~10x full fine-tuning "
                                "rates: Hu et al. used 4e-4–5e-4 for RoBERTa-base on GLUE; above ~3e-3 "
                                "runs often diverge, below 1e-4 the zero-initialised update barely moves."),
            lora_dropout=Range(0.0, 0.2, 0.1, "0.05–0.1 is common on small labelled sets (Hu et al. used 0.1); "
                               "more than ~0.2 slows learning without a clear regularisation gain."),
            epochs=Range(1, 20, 3, "A few passes usually suffice; long schedules (Hu et al. went to 30–80 "
                         "epochs on tiny GLUE sets) need eval-based model selection to avoid memorising."),
            steps=Range(100, 50_000, None, _STEPS_WHY, above="info"),
            batch_size=Range(8, 256, 32, "Effective batches of 16–64 are typical for GLUE-style fine-tuning; "
                             "below 8 the gradient noise is high at LoRA learning rates.", above="info"),
            mlp_targets=False,
            mlp_rationale="Hu et al. adapted only the attention projections (W_q, W_v) and matched full "
                          "fine-tuning on GLUE; MLP targets add parameters for little gain on label-level tasks.",
            aliases=("sst2", "sst-2", "sst", "glue", "cola", "mnli", "qnli", "qqp", "rte", "mrpc", "stsb",
                     "sts-b", "wnli", "sentiment", "easy_classification", "imdb", "rotten_tomatoes", "yelp",
                     "ag_news", "emotion", "tweet_eval", "nli", "boolq", "text_classification",
                     "seq_cls", "token_cls", "ner"),
        ),
        TaskProfile(
            name="reasoning",
            description="multi-step reasoning with generated solutions (math word problems, chain of thought)",
            rank=Range(8, 64, 16, "Math and multi-step reasoning need more capacity than classification: "
                       "Biderman et al. (2024) found low ranks fall well short of full fine-tuning on math."),
            scale=Range(0.25, 4, 2, _SCALE_WHY),
            learning_rate=Range(3e-5, 5e-4, 2e-4, "QLoRA used 1e-4–2e-4 on 7B–65B decoders; above ~5e-4 "
                                "LoRA on LLMs tends to spike or diverge, below 3e-5 it learns very slowly."),
            lora_dropout=Range(0.0, 0.1, 0.05, _DROPOUT_LLM),
            epochs=Range(1, 5, 3, "GSM8K-style fine-tuning usually runs 1–3 epochs; beyond ~5 the model "
                         "memorises the training solutions."),
            steps=Range(200, 100_000, None, _STEPS_WHY, above="info"),
            batch_size=Range(8, 128, 16, "QLoRA trained with effective batches of 16–64; below 8 updates "
                             "are noisy on long, variable-length targets.", above="info"),
            mlp_targets=True,
            mlp_rationale=_ALL_LINEAR,
            aliases=("gsm8k", "math", "maths", "mathqa", "aqua", "aqua_rat", "svamp", "asdiv", "metamath",
                     "metamathqa", "arithmetic", "cot", "chain_of_thought", "strategyqa", "logic", "arc",
                     "hellaswag", "commonsense"),
        ),
        TaskProfile(
            name="generation",
            description="open-ended generation (chat, instruction following, code, summarization)",
            rank=Range(8, 64, 16, "Instruction and chat tuning commonly use r=8–64 (QLoRA: r=64 on every "
                       "linear layer); code needs the higher end (Biderman et al., 2024)."),
            scale=Range(0.25, 4, 2, _SCALE_WHY),
            learning_rate=Range(5e-5, 5e-4, 2e-4, "Common LoRA rates for decoder LLMs are 1e-4–3e-4 (QLoRA "
                                "2e-4, Alpaca-LoRA 3e-4); above ~5e-4 loss spikes are common."),
            lora_dropout=Range(0.0, 0.1, 0.05, _DROPOUT_LLM),
            epochs=Range(1, 5, 3, "Instruction data is usually seen 1–3 times; more epochs memorise "
                         "responses and hurt held-out quality."),
            steps=Range(200, 100_000, None, _STEPS_WHY, above="info"),
            batch_size=Range(8, 256, 16, "QLoRA and Alpaca-LoRA used effective batches of 16–128; below 8 "
                             "updates are noisy on long sequences.", above="info"),
            mlp_targets=True,
            mlp_rationale=_ALL_LINEAR,
            aliases=("chat", "instruct", "instruction", "instructions", "sft", "code", "coding",
                     "summarization", "summarisation", "summary", "dialogue", "dialog", "alpaca", "dolly",
                     "oasst", "translation", "causal_lm", "text_generation", "lm", "language_modeling",
                     "qa", "seq2seq", "writing"),
        ),
    )
}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def find_profile(task: str) -> TaskProfile | None:
    """The profile for a task or alias (`sst2`, `glue/sst2`, `GSM8K`), or None."""
    table = {_key(alias): p for p in PROFILES.values() for alias in (p.name, *p.aliases)}
    candidates = [task, *reversed(task.split("/"))]  # `glue/sst2`: the whole, then the most specific part
    for candidate in candidates:
        profile = table.get(_key(candidate))
        if profile is not None:
            return profile
    return None


def resolve_profile(task: str) -> TaskProfile:
    """The task's profile; an unknown name is a `UsageError` listing the known ones."""
    profile = find_profile(task)
    if profile is None:
        known = "; ".join(f"{p.name} (also {', '.join(p.aliases[:6])}, ...)" for p in PROFILES.values())
        raise UsageError(f"unknown task {task!r}; known profiles: {known}")
    return profile


# --- model module naming ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelNaming:
    """Module paths of an architecture. `{w}` is the task model's wrapper attribute (`bert.`,
    `model.`, or nothing for the bare model) and `{i}` the block index; each path has a type."""

    blocks: tuple[str, ...]  # per-block prefixes, e.g. "{w}encoder.layer.{i}."
    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    top: Mapping[str, str]  # paths outside the blocks -> "embed", "head" or "other"
    wrappers: tuple[str, ...] = ("",)


def _naming(blocks: str, attn: str, mlp: str, top: str, wrappers: str = "") -> ModelNaming:
    """Space-separated path lists; `top` entries are `path:type`."""
    return ModelNaming(
        blocks=tuple(blocks.split()), attn=tuple(attn.split()), mlp=tuple(mlp.split()),
        top=dict(item.split(":") for item in top.split()),
        wrappers=("", *(w + "." for w in wrappers.split())),
    )


_BERT_TOP = (
    "{w}embeddings.word_embeddings:embed {w}embeddings.position_embeddings:embed "
    "{w}embeddings.token_type_embeddings:embed {w}embeddings_project:other {w}pooler.dense:other "
    "classifier:head classifier.dense:head classifier.out_proj:head lm_head.dense:head lm_head.decoder:head "
    "cls.predictions.transform.dense:head cls.predictions.decoder:head"
)
_BERT_MLP = "intermediate.dense output.dense"
_DECODER_TOP = "{w}embed_tokens:embed lm_head:head score:head"
_LLAMA = _naming("{w}layers.{i}.", "self_attn.q_proj self_attn.k_proj self_attn.v_proj self_attn.o_proj",
                 "mlp.gate_proj mlp.up_proj mlp.down_proj", _DECODER_TOP, "model")
_GPT2 = _naming("{w}h.{i}.", "attn.c_attn attn.c_proj", "mlp.c_fc mlp.c_proj",
                "{w}wte:embed {w}wpe:embed lm_head:head score:head", "transformer")
_FALCON = _naming("{w}h.{i}.", "self_attention.query_key_value self_attention.dense",
                  "mlp.dense_h_to_4h mlp.dense_4h_to_h", "{w}word_embeddings:embed lm_head:head score:head",
                  "transformer")
_T5_ATTN = " ".join(f"layer.{n}.{kind}.{p}" for n, kind in ((0, "SelfAttention"), (1, "EncDecAttention"))
                    for p in "qkvo")
_T5_MLP = " ".join(f"layer.{n}.DenseReluDense.{p}" for n in (1, 2) for p in ("wi", "wo", "wi_0", "wi_1"))


def _bert_like(wrapper: str, attn: str = "attention.self.query attention.self.key attention.self.value "
               "attention.output.dense") -> ModelNaming:
    return _naming("{w}encoder.layer.{i}.", attn, _BERT_MLP, _BERT_TOP, wrapper)


MODEL_NAMING: dict[str, ModelNaming] = {
    "bert": _bert_like("bert"),
    "roberta": _bert_like("roberta"),
    "xlm-roberta": _bert_like("roberta"),
    "camembert": _bert_like("roberta"),
    "electra": _bert_like("electra"),
    "deberta-v2": _bert_like("deberta", "attention.self.query_proj attention.self.key_proj "
                             "attention.self.value_proj attention.output.dense"),
    "distilbert": _naming("{w}transformer.layer.{i}.", "attention.q_lin attention.k_lin attention.v_lin "
                          "attention.out_lin", "ffn.lin1 ffn.lin2", "{w}embeddings.word_embeddings:embed {w}embeddings.position_embeddings:embed "
                          "pre_classifier:head classifier:head vocab_transform:head vocab_projector:head",
                          "distilbert"),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "gemma2": _LLAMA, "olmo": _LLAMA, "olmo2": _LLAMA, "granite": _LLAMA, "smollm3": _LLAMA,
    "phi3": _naming("{w}layers.{i}.", "self_attn.qkv_proj self_attn.o_proj", "mlp.gate_up_proj mlp.down_proj",
                    _DECODER_TOP, "model"),
    "phi": _naming("{w}layers.{i}.", "self_attn.q_proj self_attn.k_proj self_attn.v_proj self_attn.dense",
                   "mlp.fc1 mlp.fc2", _DECODER_TOP, "model"),
    "opt": _naming("{w}layers.{i}.", "self_attn.q_proj self_attn.k_proj self_attn.v_proj self_attn.out_proj",
                   "fc1 fc2", _DECODER_TOP + " {w}embed_positions:embed", "model.decoder decoder"),
    "gpt2": _GPT2,
    "gpt_neox": _naming("{w}layers.{i}.", "attention.query_key_value attention.dense",
                        "mlp.dense_h_to_4h mlp.dense_4h_to_h", "{w}embed_in:embed embed_out:head lm_head:head score:head", "gpt_neox"),
    "falcon": _FALCON,
    "bloom": _FALCON,
    "t5": _naming("encoder.block.{i}. decoder.block.{i}.", _T5_ATTN, _T5_MLP, "shared:embed encoder.embed_tokens:embed decoder.embed_tokens:embed lm_head:head"),
}
MODEL_NAMING["mt5"] = MODEL_NAMING["t5"]

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def module_names(naming: ModelNaming, n_layers: int) -> dict[str, str]:
    """Every module path of the architecture with `n_layers` blocks, mapped to its type."""
    out: dict[str, str] = {}
    for w in naming.wrappers:
        for block in naming.blocks:
            for i in range(n_layers):
                prefix = block.format(w=w, i=i)
                out.update({prefix + p: "attn" for p in naming.attn})
                out.update({prefix + p: "mlp" for p in naming.mlp})
        out.update({path.format(w=w): kind for path, kind in naming.top.items()})
    return out


@dataclass(frozen=True)
class ModelInfo:
    """What a model's `config.json` tells the checks: its type, depth and module paths."""

    path: str
    model_type: str | None
    n_layers: int | None
    module_types: Mapping[str, str] | None  # module path -> attn/mlp/embed/head/other; None: unknown naming
    architectures: tuple[str, ...] = ()  # the config's `architectures`: which head was saved

    @classmethod
    def from_config(cls, path: str, cfg: Mapping[str, Any]) -> ModelInfo:
        model_type = cfg["model_type"] if isinstance(cfg.get("model_type"), str) else None
        counts = [cfg.get(k) for k in LAYER_COUNT_KEYS]
        n_layers = next((c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c > 0), None)
        naming = MODEL_NAMING.get(model_type or "")
        archs = cfg.get("architectures")
        archs = tuple(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ()
        return cls(path, model_type, n_layers, module_names(naming, n_layers or 1) if naming else None, archs)


def valid_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def matches_target(targets: str | list[str], name: str) -> bool:
    """PEFT's `target_modules` rule: a string must fully match the module path as a regex;
    a list entry must be the path itself or a dotted suffix of it (`q_proj`, `self_attn.q_proj`)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)
