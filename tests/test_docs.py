"""The documentation cannot drift from the code: generated pages are regenerated and compared,
quoted error messages must still occur in the source, and links must lead somewhere."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _script(name: str):
    """A module of scripts/ (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def api_reference():
    return _script("api_reference")


def test_api_reference_is_up_to_date(api_reference):
    expected = api_reference.render()
    assert (DOCS / "API.md").read_text(encoding="utf-8") == expected, \
        "docs/API.md is out of date: run python scripts/api_reference.py"


def test_api_reference_documents_every_public_name_and_every_command(api_reference):
    from timm_branch.cli import build_parser

    text = (DOCS / "API.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#### (?:class |exception )?`([\w.]+)", text, re.M))
    for package in ("timm_branch", "timm_branch.data", "timm_branch.evaluate", "timm_branch.ssl", "timm_branch.train"):
        module = importlib.import_module(package)
        missing = [name for name in module.__all__ if not any(h.rsplit(".", 1)[-1] == name for h in headings)]
        assert not missing, f"{package}.__all__ names without a section in docs/API.md: {missing}"
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        section = text.split(f"### `timm-branch {name}`", 1)[1].split("\n### ", 1)[0]
        flags = [s for action in sub._actions for s in action.option_strings if s not in ("-h", "--help")]
        assert all(f"`{flag}`" in section for flag in flags), f"timm-branch {name}: flags missing from docs/API.md"


def test_readme_coverage_summary_is_up_to_date():
    summary = _script("coverage_summary")
    readme = README.read_text(encoding="utf-8")
    assert summary.updated_readme(readme, (DOCS / "COVERAGE.md").read_text(encoding="utf-8")) == readme, \
        "README.md's supported-families summary is out of date: run python scripts/coverage_summary.py"


def _message_templates() -> list[re.Pattern]:
    """Every string literal in timm_branch as a regex: f-string fields match any text, and only
    literals with at least 20 characters of their own count (so ``f"{a}: {b}"`` matches nothing)."""
    templates = []
    for path in sorted((ROOT / "timm_branch").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts = [node.value]
            elif isinstance(node, ast.JoinedStr):
                parts = [v.value if isinstance(v, ast.Constant) else None for v in node.values]
            else:
                continue
            if sum(len(p) for p in parts if p) >= 20:
                templates.append(re.compile("".join(re.escape(p) if p is not None else ".+?" for p in parts), re.S))
    return templates


def test_troubleshooting_quotes_messages_that_the_source_still_raises():
    text = (DOCS / "TROUBLESHOOTING.md").read_text(encoding="utf-8")
    quotes = re.findall(r"^```message\n(.*?)\n```$", text, re.M | re.S)
    assert len(quotes) >= 15
    templates = _message_templates()
    stale = [q for q in quotes if not any(t.fullmatch(q) for t in templates)]
    assert not stale, f"docs/TROUBLESHOOTING.md quotes messages no longer in timm_branch: {stale}"


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_lead_to_files(page):
    text = page.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    broken = [t for t in targets if "://" not in t and not (page.parent / t).exists()]
    assert not broken, f"{page.name}: broken links {broken}"


def test_readme_setup_commands_are_the_ones_ci_runs_verbatim():
    readme = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    setup = readme.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert commands == ["pip install -e . && timm-branch train", 'pip install -e ".[test]" && pytest']
    assert all(command in ci for command in commands)
