"""The README's install line and the declared dependencies: what the set-up promises.

pip here is configured with a local CPU wheel of torch, so resolving the install line would
prove nothing about a user's machine; these tests read the text and the metadata instead.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Imports that are optional on purpose: each sits in a try whose ImportError handler raises a
# one-line UserError naming what to install.
OPTIONAL_MODULES = {"cdfvd"}


def _setup_commands() -> list[str]:
    """The command lines (comments dropped) of every bash block in the Set-up section."""
    section = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    return [
        line.strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_the_setup_is_two_commands_install_and_run_then_tox():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("qvd-bench run")
    assert commands[1] == "pip install tox && tox"


def test_the_install_line_selects_the_cpu_build_of_torch_first():
    install = _setup_commands()[0]
    steps = [step.strip() for step in install.split("&&")]
    torch_step = f"pip install torch --index-url {CPU_INDEX}"
    # torch from the CPU index before the package, so pip keeps it instead of taking CUDA.
    assert steps[0] == torch_step or "--torch-backend=cpu" in steps[0], install
    assert steps.index("pip install -e .") > 0


def test_the_readme_states_the_supported_torch_range_that_ci_tests():
    torch_requirement = next(
        Requirement(spec)
        for spec in PYPROJECT["project"]["dependencies"]
        if Requirement(spec).name == "torch"
    )
    tox_pin = re.search(r"deps = torch==([\d.]+)", (ROOT / "tox.ini").read_text()).group(1)
    assert torch_requirement.specifier.contains(tox_pin)
    assert f"`torch{torch_requirement.specifier}`" in README
    assert f"`torch=={tox_pin}`" in README


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level module -> files of qvd_bench importing it (imports inside functions too)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "qvd_bench").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "qvd_bench":
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_module_the_package_imports_is_a_base_dependency():
    declared = {
        canonicalize_name(Requirement(spec).name) for spec in PYPROJECT["project"]["dependencies"]
    }
    distributions = packages_distributions()
    missing = {}
    for module, files in _third_party_imports().items():
        if module in OPTIONAL_MODULES:
            continue
        owners = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if not owners & declared:
            missing[module] = files
    assert not missing, f"imported but not in [project] dependencies: {missing}"


def test_optional_imports_fail_with_a_line_that_names_the_package():
    for module in OPTIONAL_MODULES:
        for file in _third_party_imports().get(module, []):
            source = (ROOT / file).read_text()
            guarded = [
                node
                for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Try)
                and any(module in ast.unparse(stmt) for stmt in node.body)
                and any(
                    "ImportError" in ast.unparse(handler.type)
                    and "UserError" in ast.unparse(handler)
                    for handler in node.handlers
                )
            ]
            assert guarded, f"{file} imports {module} without a one-line error"


def test_ci_hands_ci_true_to_the_tests_so_the_browser_check_fails_without_chromium():
    # tox passes only the variables it is told to: without CI in pass_env the report's
    # Chromium test would skip in CI instead of failing.
    import configparser

    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    assert "CI" in tox["testenv"]["pass_env"].split()
    assert 'export CI="${CI:-true}"' in (ROOT / ".ci" / "run").read_text()
