"""Every ``--flag`` the docs show with a ``patchssl`` command exists in that command's parser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from patchssl.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

_PARSER = build_parser()
_SUB = next(a for a in _PARSER._actions if a.dest == "command")
FLAGS = {
    name: {flag for action in command._actions for flag in action.option_strings}
    for name, command in _SUB.choices.items()
}
_COMMAND = re.compile(r"\bpatchssl (" + "|".join(map(re.escape, FLAGS)) + r")\b")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_HEADING = re.compile(r"^#+ `patchssl (\w+)`")


def _logical_lines(text: str):
    """Lines with shell continuations (a trailing backslash) joined, with their numbers."""
    buffer, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not buffer:
            start = number
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        yield start, buffer + line
        buffer = ""


def _claims():
    """``(doc:line, command or None, flag)``: None = some command must take the flag."""
    for doc in DOCS:
        section = None  # the command a `patchssl CMD` heading is about
        fence = False
        for number, line in _logical_lines(doc.read_text()):
            where = f"{doc.relative_to(ROOT)}:{number}"
            if line.startswith("```"):
                fence = not fence
                continue
            heading = _HEADING.match(line) if not fence else None
            if heading:
                section = heading.group(1)
            elif line.startswith("#") and not fence:
                section = None
            # a shown command line: its flags, up to a pipe, another command or a comment
            for match in _COMMAND.finditer(line):
                rest = re.split(r"\||&&|;|`| #", line[match.end() :])[0]
                for flag in _FLAG.findall(rest):
                    yield where, match.group(1), flag
            # an option table row (not torchrun's, nor a benchmark script's), in a command's
            # section or a shared one
            if line.startswith("|") and not fence and "torchrun" not in line:
                cells = line.split("|")[1:]
                if re.search(r"\.(py|sh)`", cells[0]):  # a script in benchmarks/
                    continue
                for flag in _FLAG.findall(" ".join(cells)):
                    yield where, section, flag


CLAIMS = list(_claims())


def test_the_docs_show_flags_at_all():
    assert len(CLAIMS) > 50
    assert any(flag == "--image-column" for _, _, flag in CLAIMS)


@pytest.mark.parametrize(("where", "command", "flag"), CLAIMS, ids=[c[0] for c in CLAIMS])
def test_documented_flag_exists(where, command, flag):
    if command is None:
        assert any(flag in flags for flags in FLAGS.values()), f"{where}: no command takes {flag}"
    else:
        assert flag in FLAGS[command], f"{where}: `patchssl {command}` has no {flag}"
