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
