"""Adapter reading against PEFT itself: pattern matching, key parsing and saved adapters.

The ground-truth tests build tiny models from a config (no downloads), wrap them with
PEFT, give every LoRA factor random values, save them with `save_pretrained` and check
that what we read back is exactly what PEFT's layers hold and apply.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from gradience.errors import AdapterError, UnsupportedAdapterError, UsageError
from gradience.lora.reader import Adapter, LoraModule, LoraSettings, parse_lora_key, pattern_key
from gradience.mechanic.audit import audit
from tests.factories import AdapterSpec, ModuleSpec, write_adapter

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

SAVED_PREFIX = "base_model.model."


# --- pattern_key agrees with PEFT's get_pattern_key --------------------------------------


def _peft_pattern_key(keys: list[str], name: str) -> str | None:
    """PEFT's answer in our convention (PEFT returns the name itself when nothing matches).

    Names below are dotted identifiers, so a name used as a key always matches itself: a
    returned value that is one of the keys is therefore always a real match.
    """
    found = get_pattern_key(keys, name)
    return found if found in keys else None


PATTERN_CASES = [
    (["q_proj"], "model.layers.0.self_attn.q_proj", "q_proj"),
    (["q_proj"], "model.layers.0.self_attn.xq_proj", None),  # suffix, but not at a dot
    (["q_proj"], "q_proj", "q_proj"),  # the whole name
    (["q_proj"], "model.layers.0.self_attn.q_proj.base", None),  # must match at the end
    (["self_attn.q_proj"], "model.layers.0.self_attn.q_proj", "self_attn.q_proj"),
    (["attn.c_proj"], "transformer.h.0.mlp.c_proj", None),
    (["attn.c_proj"], "transformer.h.0.attn.c_proj", "attn.c_proj"),
    ([r"layers\.1\..*q_proj"], "model.layers.1.self_attn.q_proj", r"layers\.1\..*q_proj"),
    ([r"layers\.1\..*q_proj"], "model.layers.11.self_attn.q_proj", None),
    ([r"layers\.1\..*q_proj"], "model.layers.0.self_attn.q_proj", None),
    ([r"layers\.(0|1)\..*"], "model.layers.0.mlp.down_proj", r"layers\.(0|1)\..*"),
    ([".*q_proj"], "model.layers.0.self_attn.xq_proj", ".*q_proj"),  # a regex may cross dots
    (["k_proj", "q_proj", "proj"], "a.q_proj", "q_proj"),
    (["q_proj", r"layers\.1\..*q_proj"], "model.layers.1.self_attn.q_proj", "q_proj"),  # first wins
    ([r"layers\.1\..*q_proj", "q_proj"], "model.layers.1.self_attn.q_proj", r"layers\.1\..*q_proj"),
    (
        ["model.layers.0.self_attn.q_proj"],
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.q_proj",
    ),  # a full path
    (["model.layers.0.self_attn.q_proj"], "model.layers.10.self_attn.q_proj", None),
    ([], "model.layers.0.self_attn.q_proj", None),
]


@pytest.mark.parametrize(("keys", "name", "expected"), PATTERN_CASES)
def test_pattern_key_hand_picked_cases_agree_with_peft(
    keys: list[str], name: str, expected: str | None
) -> None:
    assert pattern_key(keys, name) == expected
    assert _peft_pattern_key(keys, name) == expected


SEGMENTS = ["model", "layers", "h", "0", "1", "11", "self_attn", "attn", "mlp", "q_proj",
            "xq_proj", "k_proj", "c_proj", "down_proj"]
_dotted = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5).map(".".join)
_regex_keys = st.one_of(
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map(".".join),  # plain suffixes
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map(r"\.".join),  # escaped dots
    st.sampled_from(SEGMENTS).map(lambda s: ".*" + s),
    st.sampled_from(SEGMENTS).map(lambda s: s + r"\..*"),
    st.tuples(st.sampled_from(SEGMENTS), st.sampled_from(SEGMENTS)).map(
        lambda ab: rf"({ab[0]}|{ab[1]})"
    ),
    st.tuples(st.sampled_from(["0", "1", "11"]), st.sampled_from(SEGMENTS)).map(
        lambda ab: rf"layers\.{ab[0]}\..*{ab[1]}"
    ),
)


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(_regex_keys, max_size=5), name=_dotted)
def test_pattern_key_property_agrees_with_peft(keys: list[str], name: str) -> None:
    assert pattern_key(keys, name) == _peft_pattern_key(keys, name)


def test_pattern_key_tolerates_a_key_that_is_not_a_regex() -> None:
    # PEFT itself would crash on such a key; we fall back to a plain dotted suffix.
    assert pattern_key(["q_proj["], "a.q_proj[") == "q_proj["
    assert pattern_key(["q_proj["], "a.xq_proj[") is None


# --- parse_lora_key ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
         ("model.layers.0.self_attn.q_proj", "lora_A", None)),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
         ("model.layers.0.self_attn.q_proj", "lora_B", None)),
        ("base_model.model.model.embed_tokens.lora_embedding_A",
         ("model.embed_tokens", "lora_embedding_A", None)),
        ("base_model.model.model.embed_tokens.lora_embedding_B",
         ("model.embed_tokens", "lora_embedding_B", None)),
        ("x.lora_A.default.weight", ("x", "lora_A", "default")),
        ("x.lora_B.foo.weight", ("x", "lora_B", "foo")),
        ("x.lora_embedding_A.default", ("x", "lora_embedding_A", "default")),
        ("base_model.model.x.lora_magnitude_vector", ("x", "lora_magnitude_vector", None)),
        ("x.lora_magnitude_vector.default.weight", ("x", "lora_magnitude_vector", "default")),
        ("x.lora_A.weight", ("x", "lora_A", None)),  # no saved prefix
        ("model.lora_A_proj.lora_A.weight", ("model.lora_A_proj", "lora_A", None)),
        # lora_bias=True: lora_B's bias, which PEFT adds as scale · b (not an adapter name)
        ("x.lora_B.bias", ("x", "lora_B.bias", None)),
        ("x.lora_B.default.bias", ("x", "lora_B.bias", "default")),
    ],
)
def test_parse_lora_key_lora_keys(key: str, expected: tuple[str, str, str | None]) -> None:
    assert parse_lora_key(key) == expected


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.model.embed_tokens.base_layer.weight",  # save_embedding_layers copy
        "base_model.model.lm_head.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.hada_w1_a",
        "x.lora_Ax.weight",
        "lora_A.weight",  # no module path
        "x.lora_A.default.extra.weight",
        "x.lora_A.bias",  # PEFT's lora_A has no bias
    ],
)
def test_parse_lora_key_non_lora_keys(key: str) -> None:
    assert parse_lora_key(key) is None


# --- ground truth from real PEFT ---------------------------------------------------------


def _tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
    ))


def _tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
        bos_token_id=0, eos_token_id=0,
    ))


def _save_peft(
    model: Any, config: Any, directory: Path, adapter_name: str = "default", seed: int = 1,
    **save_kwargs: Any,
) -> Any:
    """Wrap, randomise every LoRA tensor (PEFT zero-inits lora_B and lora_embedding_A), save."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if ".lora_" in name:
                    p.copy_(0.1 * torch.randn_like(p))
        peft_model.save_pretrained(directory, **save_kwargs)
    return peft_model


def _lora_layers(peft_model: Any, adapter_name: str = "default") -> dict[str, Any]:
    return {
        name.removeprefix(SAVED_PREFIX): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.r
    }


def _assert_matches_peft(
    report: Any, peft_model: Any, adapter_name: str = "default", fan_in_fan_out: bool = False
) -> None:
    """r, alpha, scale and singular values of every module equal what PEFT applies."""
    layers = _lora_layers(peft_model, adapter_name)
    rows = {m.name: m for m in report.modules}
    assert set(rows) == set(layers)
    peft_model.double()  # exact: the saved float32 values, multiplied in float64
    for name, layer in layers.items():
        row = rows[name]
        assert row.status == "ok", name
        assert row.r == layer.r[adapter_name], name
        assert row.alpha == layer.lora_alpha[adapter_name], name
        assert row.scale == pytest.approx(layer.scaling[adapter_name], rel=1e-12), name
        delta = layer.get_delta_weight(adapter_name).detach()
        truth = torch.linalg.svdvals(delta).numpy()
        ours = np.asarray(row.singular_values)
        assert len(ours) == row.r, name
        assert ours == pytest.approx(truth[: len(ours)], rel=1e-6), name
        assert np.all(truth[len(ours):] <= 1e-9 * truth[0]), name  # rank-r update
        assert row.frobenius_norm == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-9)
        if row.kind == "embedding" or not fan_in_fan_out:
            assert row.shape == tuple(delta.shape), name
        else:  # Conv1D: PEFT's delta is in the base layer's (in, out) orientation
            assert row.shape == tuple(delta.T.shape), name


def test_llama_adapter_matches_peft_layers(tmp_path: Path) -> None:
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={r"layers\.1\..*q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\.down_proj": 5},
    )
    peft_model = _save_peft(_tiny_llama(), config, tmp_path / "llama")
    adapter = Adapter.open(tmp_path / "llama")
    assert adapter.settings.use_rslora
    assert "base_model.model.model.embed_tokens.base_layer.weight" in adapter.other_tensors
    report = audit(tmp_path / "llama")
    assert report.problems == ()
    assert report.warnings == ()
    rows = {m.name: m for m in report.modules}
    # the patterns really were exercised, with rsLoRA's alpha / sqrt(r)
    assert {m.r for m in report.modules} == {2, 4, 6}
    assert rows["model.layers.1.self_attn.q_proj"].r == 2
    assert rows["model.layers.0.self_attn.q_proj"].r == 4
    assert rows["model.layers.0.mlp.down_proj"].alpha == 5
    assert rows["model.layers.0.mlp.down_proj"].scale == pytest.approx(5 / math.sqrt(6))
    assert rows["model.layers.1.self_attn.v_proj"].scale == pytest.approx(3 / 2)
    assert rows["model.embed_tokens"].kind == "embedding"
    assert rows["model.embed_tokens"].shape == (64, 32)
    _assert_matches_peft(report, peft_model)


def test_gpt2_conv1d_fan_in_fan_out_adapter_matches_peft_layers(tmp_path: Path) -> None:
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj"],
        rank_pattern={"attn.c_proj": 2}, alpha_pattern={r"h\.1\.mlp\.c_proj": 2},
    )
    peft_model = _save_peft(_tiny_gpt2(), config, tmp_path / "gpt2")
    report = audit(tmp_path / "gpt2")
    assert Adapter.open(tmp_path / "gpt2").settings.fan_in_fan_out
    assert report.problems == ()
    rows = {m.name: m for m in report.modules}
    assert rows["transformer.h.0.attn.c_attn"].shape == (96, 32)
    assert rows["transformer.h.0.attn.c_proj"].r == 2
    assert rows["transformer.h.0.mlp.c_proj"].r == 4
    assert rows["transformer.h.1.mlp.c_proj"].alpha == 2
    assert rows["transformer.h.0.mlp.c_proj"].alpha == 8
    _assert_matches_peft(report, peft_model, fan_in_fan_out=True)


def test_bin_weights_give_the_same_audit_as_safetensors(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _save_peft(_tiny_llama(), config, tmp_path / "st")
    peft_model = _save_peft(_tiny_llama(), config, tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    st_report, bin_report = audit(tmp_path / "st"), audit(tmp_path / "bin")
    assert [m.singular_values for m in bin_report.modules] == [
        m.singular_values for m in st_report.modules
    ]
    _assert_matches_peft(bin_report, peft_model)


def test_lora_bias_is_not_mistaken_for_an_adapter_name(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)
    peft_model = _save_peft(_tiny_llama(), config, tmp_path / "bias")
    adapter = Adapter.open(tmp_path / "bias")
    assert adapter.module_names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert adapter.other_tensors == []  # closed world: the bias belongs to its module
    for module in adapter.modules():
        assert isinstance(module, LoraModule) and module.lora_bias is not None
        layer = peft_model.get_submodule(f"base_model.model.{module.name}")
        np.testing.assert_array_equal(module.lora_bias, layer.lora_B["default"].bias.detach().numpy())
    report = audit(tmp_path / "bias")
    assert report.problems == ()
    _assert_matches_peft(report, peft_model)


def test_dora_adapter_is_audited_with_a_warning(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    peft_model = _save_peft(_tiny_llama(), config, tmp_path / "dora")
    adapter = Adapter.open(tmp_path / "dora")
    assert adapter.is_dora
    assert all(m.dora for m in adapter.modules())
    report = audit(tmp_path / "dora")
    assert report.use_dora is True
    assert any("DoRA" in w for w in report.warnings)
    assert report.problems == ()
    assert report.summary.n_modules == 4
    _assert_matches_peft(report, peft_model)  # the B·A part, as PEFT's get_delta_weight


def test_dora_is_detected_from_magnitude_vectors_even_if_config_says_no(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    _save_peft(_tiny_llama(), config, tmp_path / "dora")
    cfg_path = tmp_path / "dora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = False
    cfg_path.write_text(json.dumps(cfg))
    report = audit(tmp_path / "dora")
    assert report.use_dora is True
    assert any("DoRA" in w for w in report.warnings)


def test_named_adapter_in_a_subfolder_is_pointed_to(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    peft_model = _save_peft(_tiny_llama(), config, tmp_path / "out", adapter_name="foo")
    assert (tmp_path / "out" / "foo" / "adapter_config.json").is_file()
    with pytest.raises(UsageError) as exc:
        Adapter.open(tmp_path / "out")
    assert "foo" in str(exc.value)
    assert str(tmp_path / "out") in str(exc.value)
    report = audit(tmp_path / "out" / "foo")
    _assert_matches_peft(report, peft_model, adapter_name="foo")


def test_peft_reordered_overlapping_rank_pattern_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    # save_pretrained writes rank_pattern with sorted keys, so "first match wins" can pick
    # another key than at training time; PEFT's own reload then fails on the shape. We
    # follow the saved config, and report the module instead of guessing.
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"],
        rank_pattern={"q_proj": 2, r"layers\.1\..*q_proj": 3},
    )
    _save_peft(_tiny_llama(), config, tmp_path / "order")
    saved = json.loads((tmp_path / "order" / "adapter_config.json").read_text())
    assert list(saved["rank_pattern"]) == [r"layers\.1\..*q_proj", "q_proj"]
    report = audit(tmp_path / "order")
    assert [p["module"] for p in report.problems] == ["model.layers.1.self_attn.q_proj"]
    assert "rank 2" in report.problems[0]["problem"] and "r=3" in report.problems[0]["problem"]
    assert [m.name for m in report.modules] == ["model.layers.0.self_attn.q_proj"]


# --- pattern keys that match nothing ------------------------------------------------------


def _factory_adapter(tmp_path: Path, **kw: Any) -> Path:
    mods = {
        f"model.layers.{i}.self_attn.{p}": ModuleSpec(16, 16, [1.0, 0.5])
        for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    return write_adapter(tmp_path / "a", AdapterSpec(modules=mods, r=4, lora_alpha=8, **kw))


def test_unmatched_pattern_keys_are_listed_and_warned(tmp_path: Path) -> None:
    d = _factory_adapter(
        tmp_path, rank_pattern={"q_proj": 2, "qproj": 8}, alpha_pattern={"v_prj": 1.0},
    )
    adapter = Adapter.open(d)
    assert adapter.unmatched_pattern_keys() == {"rank_pattern": ["qproj"], "alpha_pattern": ["v_prj"]}
    report = audit(d)
    assert report.problems == ()
    assert any("rank_pattern" in w and "qproj" in w for w in report.warnings)
    assert any("alpha_pattern" in w and "v_prj" in w for w in report.warnings)
    assert {m.name: m.r for m in report.modules}["model.layers.0.self_attn.q_proj"] == 2


def test_a_shadowed_pattern_key_still_counts_as_matched(tmp_path: Path) -> None:
    # PEFT warns only about keys that match no targeted module; a key that loses to an
    # earlier one is not a typo.
    d = _factory_adapter(tmp_path, rank_pattern={"q_proj": 2, r"layers\.1\..*q_proj": 2})
    assert Adapter.open(d).unmatched_pattern_keys() == {}
    # but two keys on one module is a warning of its own (which one PEFT applies depends on key order)
    (warning,) = audit(d).warnings
    assert "model.layers.1.self_attn.q_proj" in warning and "PEFT applies the first in file order ('q_proj')" in warning


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_warns_about_the_same_unmatched_key(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"qq_proj": 2})
    with pytest.warns(RuntimeWarning, match="qq_proj"):
        get_peft_model(_tiny_llama(), config)
    _save_peft(_tiny_llama(), config, tmp_path / "typo")
    assert Adapter.open(tmp_path / "typo").unmatched_pattern_keys() == {"rank_pattern": ["qq_proj"]}


# --- adapters that are not LoRA -----------------------------------------------------------


def test_non_lora_peft_type_is_refused(tmp_path: Path) -> None:
    d = _factory_adapter(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = "LOHA"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedAdapterError, match="LOHA"):
        Adapter.open(d)
    with pytest.raises(UnsupportedAdapterError):
        audit(d)


def test_loha_tensors_under_a_lora_config_are_refused(tmp_path: Path) -> None:
    d = _factory_adapter(tmp_path)
    rng = np.random.default_rng(0)
    save_file(
        {
            f"{SAVED_PREFIX}model.layers.0.self_attn.q_proj.hada_w1_a": rng.standard_normal((16, 4)),
            f"{SAVED_PREFIX}model.layers.0.self_attn.q_proj.hada_w1_b": rng.standard_normal((4, 16)),
        },
        str(d / "adapter_model.safetensors"),
    )
    with pytest.raises(UnsupportedAdapterError) as exc:
        Adapter.open(d)
    message = str(exc.value)
    assert "LoHa" in message and "hada_w1_a" in message and "adapter_model.safetensors" in message


def test_real_peft_loha_adapter_is_refused(tmp_path: Path) -> None:
    from peft import LoHaConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(_tiny_llama(), LoHaConfig(r=4, target_modules=["q_proj"])).save_pretrained(
            tmp_path / "loha"
        )
    with pytest.raises(UnsupportedAdapterError, match="LOHA"):
        Adapter.open(tmp_path / "loha")
    # even with the config edited to claim LoRA, the tensors give it away
    (tmp_path / "loha" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(UnsupportedAdapterError, match="LoHa"):
        Adapter.open(tmp_path / "loha")


# --- config and directory errors ----------------------------------------------------------


def test_settings_defaults_and_bad_values() -> None:
    s = LoraSettings.from_dict({"peft_type": "LORA"})
    assert (s.r, s.lora_alpha, s.use_rslora, s.use_dora) == (8, 8.0, False, False)
    assert s.scale_for("anything") == 1.0
    rs = LoraSettings.from_dict({"r": 16, "lora_alpha": 8, "use_rslora": True})
    assert rs.scale_for("x") == pytest.approx(8 / 4)
    with pytest.raises(AdapterError, match="`r`"):
        LoraSettings.from_dict({"r": 0})
    with pytest.raises(AdapterError, match="invalid LoRA setting"):
        LoraSettings.from_dict({"r": "eight"})
    with pytest.raises(AdapterError, match="invalid LoRA setting"):
        LoraSettings.from_dict({"rank_pattern": ["q_proj"]})


def test_missing_directory_and_files_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=re.escape(str(tmp_path / "nope"))):
        Adapter.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"adapter_config\.json"):
        Adapter.open(tmp_path / "empty")
    d = _factory_adapter(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(UsageError, match=r"adapter_model\.safetensors"):
        Adapter.open(d)
