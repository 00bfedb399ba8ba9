"""The grammar of LoRA state-dict keys: PEFT's and kohya/diffusers', and PEFT's pattern rule.

The one place that decides which module a tensor belongs to and which factor it is; the
reader (`gradience.lora.reader`), the writer and every tool go through it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SAVED_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module paths
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
# Key fragments of PEFT methods that are not LoRA: their tensors are not B·A products.
FOREIGN_PARTS = {
    "hada_w1_a": "LoHa", "lokr_w1": "LoKr", "vera_lambda_b": "VeRA", "ia3_l": "IA3",
    "lora_E": "AdaLoRA", "oft_r": "OFT", "boft_R": "BOFT",
}
_KEY_RE = re.compile(r"^(?P<module>.+?)\.(?P<part>" + "|".join(LORA_PARTS) + r")(?P<rest>(\.[^.]+)*)$")
FORMATS = ("peft", "kohya")
# kohya / diffusers single files; every spelling maps to PEFT's part names (down = A, up = B).
_KOHYA_RE = re.compile(
    r"^(?P<module>.+?)(?:(?P<part>[._]lora[._](?:down|up)|\.lora_linear_layer\.(?:down|up)|\.lora_[AB])\.weight"
    r"|\.(?P<alpha>alpha))$"
)
_KOHYA_SPECIFIC = re.compile(r"\.lora_(?:down|up)\.|[._]lora\.(?:down|up)\.|\.lora_linear_layer\.(?:down|up)\.")
PART_LABELS = {"peft": ("lora_A", "lora_B"), "kohya": ("lora_down", "lora_up")}


def pattern_key(pattern_keys: Iterable[str], module_name: str) -> str | None:
    """The first pattern key that PEFT would apply to `module_name`, or None.

    PEFT treats each key as a regular expression that must match the end of the module
    path at a dot boundary: `re.match(rf"(.*\\.)?({key})$", name)`; the first match wins.
    """
    for key in pattern_keys:
        try:
            if re.match(rf"(.*\.)?({key})$", module_name):
                return key
        except re.error:
            if module_name == key or module_name.endswith("." + key):
                return key
    return None


def parse_lora_key(key: str, fmt: str = "peft") -> tuple[str, str, str | None] | None:
    """Split a state-dict key into (module path, LoRA part, adapter name), or None.

    `peft` handles saved keys (`base_model.model.x.lora_A.weight`, `x.lora_embedding_A`) and
    in-memory ones with an adapter-name infix (`x.lora_A.default.weight`). `kohya` maps
    `x.lora_down.weight` / `x.lora_up.weight` (and diffusers' spellings) to parts `lora_A` /
    `lora_B`, and `x.alpha` to part `alpha`; its adapter name is always None.

    Example:
        >>> parse_lora_key("lora_te_x_q_proj.lora_up.weight", "kohya")
        ('lora_te_x_q_proj', 'lora_B', None)
    """
    if fmt == "kohya":
        return _parse_kohya_key(key)
    m = _KEY_RE.match(key)
    if m is None:
        return None
    rest = [t for t in m.group("rest").split(".") if t]
    if rest and rest[-1] == "bias":
        return None  # `lora_bias=True` adds an output bias: not a factor of ΔW, not an adapter name
    if rest and rest[-1] == "weight":
        rest = rest[:-1]
    if len(rest) > 1:
        return None
    module = m.group("module").removeprefix(SAVED_PREFIX)
    return module, m.group("part"), (rest[0] if rest else None)


def _parse_kohya_key(key: str) -> tuple[str, str, str | None] | None:
    m = _KOHYA_RE.match(key)
    if m is None or (m.group("part") or "").startswith("_lora_"):  # `x_lora_down` is no spelling
        return None
    part = m.group("alpha") or ("lora_A" if m.group("part").endswith(("down", "A")) else "lora_B")
    return m.group("module"), part, None


def detect_format(names: Iterable[str]) -> str:
    """`kohya` when any key is spelled `lora_down` / `lora_up` (or diffusers' `lora.down`), else `peft`."""
    return "kohya" if any(_KOHYA_SPECIFIC.search(n) for n in names) else "peft"
