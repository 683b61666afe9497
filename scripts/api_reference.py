"""Write docs/API.md: every ``timm-branch`` command and every public Python name, from the source.

    python scripts/api_reference.py           # writes docs/API.md
    python scripts/api_reference.py --check   # exit 1 when docs/API.md is out of date

The commands come from the argparse parser of ``timm_branch.cli`` (option strings, metavars,
defaults and help, as a table per command). The Python API is every name in the ``__all__`` of
``timm_branch`` and of its public modules and subpackages, each documented once, under the first
module that exports it (the shallowest, then alphabetical): its signature and its own docstring.
Names without a docstring are listed on stderr.

The output is deterministic: commands, modules and class members are sorted by name, ``__all__``
keeps its written order, only docstrings written in timm-branch are used (never an inherited
one, e.g. from ``torch.nn.Module``), and memory addresses are removed from default values.
``tests/test_docs.py`` regenerates the page in memory and fails when the file differs.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "API.md"
PACKAGE = "timm_branch"
MAX_VALUE_REPR = 120  # longer constant values are summarised by their type


def _cell(text: str) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _dedent(text: str | None) -> str:
    return inspect.cleandoc(text) if text else ""


def _doc(obj) -> str:
    """The object's own docstring as Markdown ("" when it has none)."""
    doc = getattr(obj, "__doc__", None)
    return _markdown(_dedent(doc if isinstance(doc, str) else None))


_SECTION = re.compile(r"^(Args|Attributes|Keys|Raises|Returns|Yields):$")
_ENTRY = re.compile(r"^    ([\w*][\w*., ]*?):( .*|$)")
_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc):`~?(?:[\w.]*\.)?([\w]+)`")


def _markdown(doc: str) -> str:
    """Google-style docstring -> Markdown: sections in bold, their entries as list items, Sphinx
    roles as code, ``::`` blocks as indented code."""
    out, in_section = [], False
    for line in _ROLE.sub(r"`\1`", doc).splitlines():
        if _SECTION.match(line):
            out += [f"**{line}**", ""]
            in_section = True
        elif in_section and _ENTRY.match(line):
            name, rest = _ENTRY.match(line).groups()
            out.append(f"- `{name}`:{rest}")
        elif in_section and line.startswith("    "):
            out.append("  " + line.strip())  # continuation of the entry above
        else:
            in_section = in_section and line.startswith("    ")
            out.append(line[:-1] if line.endswith("::") else line)
    return "\n".join(out)


# -- command line ----------------------------------------------------------------------------


def _argument(action: argparse.Action) -> str:
    """How the value of an option is written: ``METAVAR``, ``M [M ...]``, or nothing for a switch."""
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        names = list(action.metavar) if isinstance(action.metavar, tuple) else [action.metavar]
    elif action.choices is not None:
        names = ["{" + ",".join(map(str, action.choices)) + "}"]
    else:
        names = [action.dest.upper() if action.option_strings else action.dest]
    if isinstance(action.nargs, int):
        names = names * (action.nargs // len(names))
    name = " ".join(names)
    return {"+": f"{name} [{name} ...]", "*": f"[{name} ...]", "?": f"[{name}]"}.get(action.nargs, name)


def _default(action: argparse.Action, fallback: dict) -> str:
    default = fallback.get(action.dest) if action.default is argparse.SUPPRESS else action.default
    if default is None or default is False or default == "":
        return ""
    return f"`{' '.join(map(str, default)) if isinstance(default, (list, tuple)) else default}`"


def _train_defaults() -> dict:
    """``TrainConfig``'s defaults: the train flags suppress argparse defaults, the config fills them in."""
    from timm_branch.train import TrainConfig

    return dataclasses.asdict(TrainConfig())


def _command_section(name: str, parser: argparse.ArgumentParser, fallback: dict) -> list[str]:
    lines = [f"### `timm-branch {name}`", "", _dedent(parser.description), "",
             "| option | value | default | description |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{_argument(action)}`"
        value = _argument(action) if action.option_strings else ""
        help_text = action.help or ""
        if "%(" in help_text:  # argparse's own placeholders
            help_text %= {"default": action.default, "prog": parser.prog}
        lines.append(f"| {flags} | {_cell(f'`{value}`' if value else '')} | {_cell(_default(action, fallback))} "
                     f"| {_cell(help_text)} |")
    return lines + [""]


def cli_reference() -> list[str]:
    from timm_branch.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {a.dest: a.help for a in commands._choices_actions}
    lines = ["## Command line", "", _dedent(parser.description), "",
             "Every command takes `--help`; `python -m timm_branch` is the same program.", "",
             "| command | what it does |", "|---|---|"]
    lines += [f"| [`timm-branch {name}`](#timm-branch-{name}) | {_cell(summaries[name])} |" for name in sorted(commands.choices)]
    lines.append("")
    for name in sorted(commands.choices):
        lines += _command_section(name, commands.choices[name], _train_defaults() if name == "train" else {})
    return lines


# -- Python API --------------------------------------------------------------------------------


def public_modules() -> list:
    """``timm_branch`` and its modules without a leading underscore that define ``__all__``,
    shallowest first, then by name."""
    package = importlib.import_module(PACKAGE)
    names = [PACKAGE] + [m.name for m in pkgutil.walk_packages(package.__path__, PACKAGE + ".")
                         if not any(part.startswith("_") for part in m.name.split("."))]
    modules = [importlib.import_module(name) for name in sorted(names, key=lambda n: (n.count("."), n))]
    return [m for m in modules if hasattr(m, "__all__")]


class _Source(str):
    """An annotation kept as written (``from __future__ import annotations``), shown without quotes."""

    def __repr__(self) -> str:
        return str(self)


def _signature(obj) -> str:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""

    def unquoted(annotation):
        return _Source(annotation) if isinstance(annotation, str) else annotation

    signature = signature.replace(
        parameters=[p.replace(annotation=unquoted(p.annotation)) for p in signature.parameters.values()],
        # A constructor's "-> None" says nothing about the class.
        return_annotation=inspect.Signature.empty if inspect.isclass(obj) else unquoted(signature.return_annotation))
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(signature))


def _own_init(cls: type) -> bool:
    """Whether the constructor signature is timm-branch's (not, e.g., ``nn.Module``'s or ``Exception``'s)."""
    owner = next((c for c in cls.__mro__ if "__init__" in vars(c) or "__new__" in vars(c)), object)
    return owner.__module__.startswith(PACKAGE)


def _value(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {', '.join(map(repr, sorted(obj, key=str)))}"
    text = repr(obj)
    return f"`{text}`" if len(text) <= MAX_VALUE_REPR else f"a `{type(obj).__name__}`"


def _members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties defined in ``cls`` itself, by name; an override without a
    docstring of its own is left out (its base class documents it: ``forward``, ``extra_repr``, ...)."""
    members = []
    for name, member in sorted(vars(cls).items()):
        overrides = any(hasattr(base, name) for base in cls.__mro__[1:])
        if name.startswith("_") or (overrides and not _doc(getattr(member, "__func__", member))):
            continue
        function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        if inspect.isfunction(function) or isinstance(member, property):
            members.append((name, member))
    return members


def _object_section(qualname: str, obj, undocumented: list[str]) -> list[str]:
    doc = _doc(obj)
    if inspect.isclass(obj):
        kind = "exception" if issubclass(obj, BaseException) else "class"
        bases = ", ".join(b.__name__ for b in obj.__bases__ if b is not object)
        lines = [f"#### {kind} `{qualname}{_signature(obj) if _own_init(obj) else ''}`", ""]
        if bases:
            lines += [f"Bases: {', '.join(f'`{b}`' for b in bases.split(', '))}", ""]
    elif callable(obj):
        lines = [f"#### `{qualname}{_signature(obj)}`", ""]
    else:
        return [f"#### `{qualname}`", "", f"Value: {_value(obj)}", ""]
    if not doc:
        undocumented.append(qualname)
    lines += [doc or "*(no docstring)*", ""]
    if inspect.isclass(obj):
        for name, member in _members(obj):
            function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            label = f"`{name}`" if isinstance(member, property) else f"`{name}{_signature(function)}`"
            member_doc = _doc(function)
            if not member_doc:
                undocumented.append(f"{qualname}.{name}")
            lines += [f"- {label}" + (" (property)" if isinstance(member, property) else "") + ":"
                      + ("\n\n" + "\n".join("  " + line if line else "" for line in member_doc.splitlines())
                         if member_doc else " *(no docstring)*"), ""]
    return lines


def python_reference(undocumented: list[str]) -> list[str]:
    lines = ["## Python API", ""]
    seen: set[tuple[str, int]] = set()
    for module in public_modules():
        own = []
        for name in module.__all__:
            obj = getattr(module, name)
            if (name, id(obj)) not in seen:
                seen.add((name, id(obj)))
                own.append((name, obj))
        if not own:
            continue
        lines += [f"### `{module.__name__}`", "", _doc(module), ""]
        for name, obj in own:
            lines += _object_section(f"{module.__name__}.{name}", obj, undocumented)
    return lines


def render(undocumented: list[str] | None = None) -> str:
    """The whole of docs/API.md."""
    undocumented = [] if undocumented is None else undocumented
    lines = ["# API reference", "",
             "Generated by `python scripts/api_reference.py` from the argparse parser and the docstrings; "
             "do not edit by hand (`tests/test_docs.py` fails when this page is out of date). "
             "Concepts: [CONCEPTS.md](CONCEPTS.md); errors and their fixes: [TROUBLESHOOTING.md](TROUBLESHOOTING.md).",
             ""]
    lines += cli_reference() + python_reference(undocumented)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with docs/API.md instead of writing it")
    args = parser.parse_args()
    undocumented: list[str] = []
    text = render(undocumented)
    for name in undocumented:
        print(f"no docstring: {name}", file=sys.stderr)
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run python scripts/api_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
