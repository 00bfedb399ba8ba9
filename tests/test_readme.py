"""The README's claims run: its Python example works and every command it names exists."""

from __future__ import annotations

import re
from pathlib import Path

from gradience.cli import build_parser
from tests.factories import AdapterSpec, ModuleSpec, write_adapter

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_api_example_runs_on_a_real_adapter(tmp_path: Path) -> None:
    spec = AdapterSpec(modules={"bert.encoder.layer.0.attention.self.query": ModuleSpec(32, 32, [2.0, 0.5])}, r=8)
    peft_dir = write_adapter(tmp_path / "peft", spec)
    example = next(b for b in _blocks("python") if "gradience.audit(" in b)
    namespace: dict[str, object] = {}
    exec(example.replace('"runs/toy/peft"', repr(str(peft_dir))), namespace)
    report = namespace["report"]
    assert report.suggestion.uniform_p90 >= 1  # type: ignore[attr-defined]


def test_every_command_in_the_readme_is_registered() -> None:
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    named = set(re.findall(r"`gradience (\w+)`", README))
    assert named and named <= set(choices), named - set(choices)


def test_golden_path_commands_parse() -> None:
    parser = build_parser()
    golden = next(b for b in _blocks("bash") if "toy_lora_run.py" in b)
    for line in golden.splitlines():
        if line.startswith("gradience "):
            parser.parse_args(line.split()[1:])


def test_every_function_in_the_api_table_is_reachable_from_the_package() -> None:
    import importlib

    import gradience

    rows = re.findall(r"\| `gradience \w+` \| `gradience\.(\w+)` \(`(gradience[\w.]*)`\)", README)
    assert len(rows) >= 10, rows
    for name, module in rows:
        # Importing the defining module first must not shadow the function (no name clash).
        importlib.import_module(module)
        func = getattr(gradience, name)
        assert callable(func) and func.__name__ == name, (name, func)
        assert func is getattr(importlib.import_module(module), name)
