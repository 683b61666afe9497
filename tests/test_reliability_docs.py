"""docs/RELIABILITY.md: every row of its fault tables points at a test that exists."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?`")


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| fault |") and not set(line) <= set("|- ")]


def test_every_fault_row_names_an_existing_test():
    rows = _table_rows((ROOT / "docs" / "RELIABILITY.md").read_text(encoding="utf-8"))
    assert len(rows) >= 40
    for row in rows:
        references = REFERENCE.findall(row)
        assert references, f"a row without a test: {row[:80]}"
        for path, name, param in references:
            source = (ROOT / path).read_text(encoding="utf-8")
            tests = {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}
            assert name.startswith("test_") and name in tests, f"{path}::{name} does not exist"
            assert not param or f'"{param}"' in source, f"{path} has no parameter set {param!r}"
