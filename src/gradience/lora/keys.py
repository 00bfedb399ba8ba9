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
    "hada_": "LoHa", "lokr_": "LoKr", "vera_lambda_b": "VeRA", "ia3_l": "IA3",
    "lora_E": "AdaLoRA", "oft_r": "OFT", "boft_R": "BOFT",
}
_KEY_RE = re.compile(r"^(?P<module>.+?)\.(?P<part>" + "|".join(LORA_PARTS) + r")(?P<rest>(\.[^.]+)*)$")
FORMATS = ("peft", "kohya")
# kohya / diffusers single files; every spelling maps to PEFT's part names (down = A, up = B).
_KOHYA_RE = re.compile(
    r"^(?P<module>.+?)(?:(?P<part>[._]lora[._](?:down|up|mid)|\.lora_linear_layer\.(?:down|up)|\.lora_[AB])\.weight"
    r"|\.(?P<alpha>alpha|dora_scale))$"
)
# Tensors a module may carry beside its LoRA parts that are copies of base weights (saved
# embedding layers, modules_to_save): listed as other tensors, never read as factors.
BASE_COPY_SUFFIXES = ("weight", "bias")
BASE_COPY_PREFIXES = ("base_layer.", "modules_to_save.", "original_module.")
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


def matching_pattern_keys(pattern_keys: Iterable[str], module_name: str) -> list[str]:
    """Every pattern key that matches `module_name` under PEFT's rule, in the given order."""
    return [k for k in pattern_keys if pattern_key([k], module_name) is not None]


def invalid_pattern_key(key: str) -> str | None:
    """Why PEFT's `re.match` would raise on this rank_pattern / alpha_pattern key, or None."""
    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error as exc:
        return str(exc)
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
        if m.group("part") != "lora_B" or len(rest) > 2:
            return None
        # `lora_bias=True`: lora_B carries a bias that PEFT adds as scale · b
        rest, part = rest[:-1], "lora_B.bias"
        return m.group("module").removeprefix(SAVED_PREFIX), part, (rest[0] if rest else None)
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
    if m.group("alpha"):
        return m.group("module"), m.group("alpha"), None
    end = m.group("part")
    part = "lora_A" if end.endswith(("down", "A")) else "lora_mid" if end.endswith("mid") else "lora_B"
    return m.group("module"), part, None


def stored_module_prefix(key: str, fmt: str = "peft") -> str | None:
    """The stored prefix of the module a LoRA key belongs to (`base_model.model.x` for PEFT), or None."""
    m = (_KOHYA_RE if fmt == "kohya" else _KEY_RE).match(key)
    return m.group("module") if m else None


def is_base_copy(suffix: str) -> bool:
    """True for a tensor under a module prefix that is a saved copy of a base weight, not LoRA."""
    return suffix in BASE_COPY_SUFFIXES or suffix.startswith(BASE_COPY_PREFIXES)


def detect_format(names: Iterable[str]) -> str:
    """`kohya` when any key is spelled `lora_down` / `lora_up` (or diffusers' `lora.down`), else `peft`."""
    return "kohya" if any(_KOHYA_SPECIFIC.search(n) for n in names) else "peft"
