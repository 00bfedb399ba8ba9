"""What a module path says about the module: its block index and its role (attn, mlp, ...).

Pure string functions over PEFT module paths (`model.layers.3.self_attn.q_proj`) and kohya's
flattened names (`lora_te_text_model_encoder_layers_3_self_attn_q_proj`), where the dots of the
path became underscores.
"""

from __future__ import annotations

import re
from typing import Any

_ATTN = {"attn", "attention", "self_attn", "self_attention", "q_proj", "k_proj", "v_proj",
         "o_proj", "query", "key", "value", "qkv_proj", "c_attn", "wqkv", "out_proj", "wq",
         "wk", "wv", "wo", "to_q", "to_k", "to_v", "to_out"}
_MLP = {"mlp", "ffn", "feed_forward", "intermediate", "gate_proj", "up_proj", "down_proj",
        "fc1", "fc2", "c_fc", "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h", "experts",
        "gate_up_proj"}
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_FLAT_LAYER_RE = re.compile(r"(?:^|_)(\d+)(?:_|$)")
_FLAT_PREFIX = "lora_"  # kohya: lora_unet_..., lora_te_..., lora_te1_...
_MAX_NGRAM = 4  # `dense_h_to_4h` is the longest underscore name in the tables


def is_flat(name: str) -> bool:
    """A kohya-style name: no dots, the module path joined with underscores."""
    return "." not in name and name.startswith(_FLAT_PREFIX)


def layer_index(name: str) -> int | None:
    """The transformer block a module sits in (first numeric path component), if any."""
    m = (_FLAT_LAYER_RE if is_flat(name) else _LAYER_RE).search(name)
    return int(m.group(1)) if m else None


def _flat_tokens(name: str) -> list[str]:
    """Underscore pieces and their joins up to 4 long, in order: `self_attn` is a table name."""
    parts = name.lower().split("_")
    out = []
    for i in range(len(parts)):
        out += ["_".join(parts[i : i + n]) for n in range(1, _MAX_NGRAM + 1) if i + n <= len(parts)]
    return out


def module_type(name: str, kind: str = "linear") -> str:
    """`attn`, `mlp`, `embed` or `other`, from the module path's components."""
    if kind == "embedding":
        return "embed"
    tokens = _flat_tokens(name) if is_flat(name) else name.lower().split(".")
    for i, tok in enumerate(tokens):
        if tok in _ATTN:
            return "attn"
        if tok in _MLP:
            return "mlp"
        # BERT-style blocks: `layer.N.output.dense` is the MLP's down projection.
        if tok == "output" and i > 0 and tokens[i - 1].isdigit():
            return "mlp"
    return "embed" if any("embed" in t for t in tokens) else "other"


def natural_key(name: str) -> list[Any]:
    """Sort key that puts `layers.10` after `layers.9`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
