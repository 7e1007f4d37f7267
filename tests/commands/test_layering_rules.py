"""Library code (everything outside ``qvd_bench/commands/``) prints nothing, exits nowhere,
and its texts (errors, notices, notes, docstrings) name parameters, never command-line
flags."""

import ast
import re
from pathlib import Path

import qvd_bench

PACKAGE = Path(qvd_bench.__file__).parent
COMMANDS = PACKAGE / "commands"
# ``python -m qvd_bench`` hands the command line's exit code to the interpreter.
EXIT_ALLOWED = {PACKAGE / "__main__.py"}


def library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if COMMANDS not in p.parents)


def _called_name(call: ast.Call) -> str:
    """``print`` for ``print(...)``, ``sys.exit`` for ``sys.exit(...)``, else ""."""
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return ""


def _where(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent)) if PACKAGE in path.parents else str(path)


def print_and_exit_calls(path: Path) -> list[str]:
    """Every call of ``print``, ``sys.exit``, ``exit`` or ``quit`` in a file, nested ones
    included, as "path:line name"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            name = _called_name(node)
            if name in ("print", "sys.exit", "exit", "quit"):
                if name == "sys.exit" and path in EXIT_ALLOWED:
                    continue
                found.append(f"{_where(path)}:{node.lineno} {name}")
    return found


def flags_in_errors(path: Path) -> list[str]:
    """Every string constant containing ``--`` inside a ``raise`` of a call (the
    constant parts of f-strings included), as "path:line text"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            for inner in ast.walk(node.exc):
                if (
                    isinstance(inner, ast.Constant)
                    and isinstance(inner.value, str)
                    and "--" in inner.value
                ):
                    found.append(f"{_where(path)}:{inner.lineno} {inner.value!r}")
    return found


# A command-line flag: "--" and a letter, at the start of a text or after white space.
FLAG = re.compile(r"(^|\s)--[a-z]")


def flags_in_strings(path: Path) -> list[str]:
    """Every string constant (docstrings and the constant parts of f-strings included)
    with a command-line flag in it, as "path:line text"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
        if is_text and FLAG.search(node.value):
            found.append(f"{_where(path)}:{node.lineno} {node.value!r}")
    return found


def test_library_neither_prints_nor_exits():
    found = [hit for path in library_files() for hit in print_and_exit_calls(path)]
    assert found == [], "print/exit outside qvd_bench/commands/:\n" + "\n".join(found)


def test_library_errors_name_parameters_not_flags():
    found = [hit for path in library_files() for hit in flags_in_errors(path)]
    assert found == [], "flags in library error texts:\n" + "\n".join(found)


def test_library_texts_name_no_flags():
    found = [hit for path in library_files() for hit in flags_in_strings(path)]
    assert found == [], "flags in library texts:\n" + "\n".join(found)


def test_the_checks_see_nested_calls_and_f_strings(tmp_path):
    """The two checks find violations inside functions and in f-strings' constant parts."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import sys\n"
        "def f(steps):\n"
        "    def g():\n"
        "        print('hello')\n"
        "    if steps < 1:\n"
        "        raise ValueError(f'--steps must be at least 1, got {steps}')\n"
        "    sys.exit(1)\n"
    )
    assert sorted(h.split()[-1] for h in print_and_exit_calls(sample)) == ["print", "sys.exit"]
    assert len(flags_in_errors(sample)) == 1
    assert len(flags_in_strings(sample)) == 1


def test_the_flag_check_sees_notices_and_docstrings_but_not_dashes(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Module doc; run it with --fast."""\n'
        "NOTICE = 'recollect with --temporal-stride 1'\n"
        "def f(n):\n"
        "    return f'{n} skipped; pass --fvd-weights'\n"
        "RULE = '-- a separator --'\n"
        "RANGE = 'x--y, a - b'\n"
    )
    assert sorted(int(h.split(":")[1].split()[0]) for h in flags_in_strings(sample)) == [1, 2, 4]


def test_commands_print_parameters_as_flags():
    from qvd_bench.commands._args import with_flags

    text = "recollect with temporal_stride=1; pass its path as weights['fvd-cd']"
    assert (
        with_flags(text) == "recollect with --temporal-stride=1; pass its path as --fvd-cd-weights"
    )
    assert with_flags("max_temporal_stride and temporal_strides") == (
        "max_temporal_stride and temporal_strides"
    )
