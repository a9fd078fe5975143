"""The README's commands stay true: every `condgen` command line in it parses with the CLI as it
is, every `make` target it names exists, and its Python blocks compile. (`make demo` runs the
train / export / serve / generate flow itself; the Node command is run by tests/test_interop.py.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from condgen.cli import build_parser

pytestmark = pytest.mark.fast
ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def command_lines() -> list[str]:
    """Shell lines of the bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


CONDGEN = [line for line in command_lines() if line.startswith("condgen ")]


def test_the_readme_shows_commands():
    assert len(CONDGEN) >= 6 and any(line.startswith("make ") for line in command_lines())


@pytest.mark.parametrize("line", CONDGEN)
def test_each_condgen_command_parses(line):
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert args.command == shlex.split(line)[1]


def test_each_make_target_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = {m.group(1) for m in re.finditer(r"^([a-z][\w-]*):", makefile, flags=re.M)}
    named = {shlex.split(line)[1] for line in command_lines() if line.startswith("make ")}
    assert named and named <= targets, named - targets


@pytest.mark.parametrize("number", range(len(blocks("python"))))
def test_each_python_block_compiles(number):
    compile(blocks("python")[number], f"README python block {number}", "exec")
