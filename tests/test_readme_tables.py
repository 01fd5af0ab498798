"""README.md's result tables are generated, not typed: each follows a `<!-- readme-table: python tools/X.py ARGS -->`
comment, and the table must be exactly what that command prints from the committed bench/results files (so a
rerun that changes a number fails here until the table is regenerated)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys

import pytest

from scale_fixtures import ROOT, tool

MARKER = re.compile(r"^<!--\s*readme-table:\s*python tools/(?P<tool>\w+)\.py (?P<args>.*?)\s*-->$")


def generated_tables() -> list[tuple[int, str, list[str], str]]:
    """(line, tool, arguments, the table below the marker) for every marker of README.md."""
    lines = (ROOT / "README.md").read_text().splitlines()
    found = []
    for index, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if match:
            table = []
            for row in lines[index + 1:]:
                if not row.startswith("|"):
                    break
                table.append(row)
            found.append((index + 1, match["tool"], shlex.split(match["args"]), "\n".join(table)))
    return found


def test_readme_has_generated_tables():
    tables = generated_tables()
    assert {name for _, name, _, _ in tables} >= {"bench_peers", "eval_quality"}
    assert all(table for *_, table in tables), "a readme-table marker must be followed by its table"


@pytest.mark.parametrize("line,name,args,table", generated_tables(), ids=lambda value: str(value)[:40])
def test_readme_table_matches_its_command(line, name, args, table, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # the tools import their shared bench_common
    monkeypatch.setattr(sys, "argv", [f"tools/{name}.py", *args])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tool(name).main()
    assert table == printed.getvalue().strip(), f"README.md line {line}: regenerate the table with its command"
