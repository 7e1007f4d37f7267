"""Every document the package's texts name (messages, notes, docstrings, comments) and the
READMEs point to is in the repository: no "see DESIGN section 7" for a file a user does
not have."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Conventional document names, which a text may give without ".md" ("DESIGN section 7").
DOCUMENT_NAMES = ("README", "DESIGN", "CONTRIBUTING", "CHANGELOG", "ARCHITECTURE", "ROADMAP")
_MARKDOWN = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)\b")
_NAMED = re.compile(r"\b(" + "|".join(DOCUMENT_NAMES) + r")\b")


def texts() -> list[Path]:
    """The package's sources, the benchmark scripts and the READMEs."""
    return sorted(
        [
            *(ROOT / "qvd_bench").rglob("*.py"),
            *(ROOT / "benchmarks").glob("*.py"),
            ROOT / "README.md",
            ROOT / "notebooks" / "README.md",
        ]
    )


def repository_markdown(root: Path) -> set[str]:
    """Relative paths of the Markdown files under ``root``, build folders left out."""
    skip = {".git", ".tox", "build", "dist", "node_modules"}
    return {
        str(p.relative_to(root))
        for p in root.rglob("*.md")
        if not skip & set(p.relative_to(root).parts)
    }


def missing_documents(path: Path, root: Path, present: set[str]) -> list[str]:
    """Every document ``path`` names that is not in ``present`` (paths relative to
    ``root``), as "file:line name". A path is looked up from the root and from the file's
    folder; a bare file name anywhere in the repository."""
    names = {Path(p).name for p in present}
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for name in _MARKDOWN.findall(line):
            beside = str((path.parent / name).resolve().relative_to(root.resolve()))
            if name.lstrip("./") in present or beside in present:
                continue
            if "/" not in name and name in names:
                continue
            found.append(f"{path.relative_to(root)}:{number} {name}")
        for name in _NAMED.findall(line):
            if f"{name}.md" not in names:
                found.append(f"{path.relative_to(root)}:{number} {name}")
    return found


def test_every_named_document_is_in_the_repository():
    present = repository_markdown(ROOT)
    missing = [m for path in texts() for m in missing_documents(path, ROOT, present)]
    assert missing == []


def test_the_check_finds_a_document_that_is_not_there(tmp_path):
    (tmp_path / "README.md").write_text("see [the notes](docs/notes.md)\n")
    source = tmp_path / "module.py"
    source.write_text(
        'raise UserError("see DESIGN section 7")\n'
        "# README.md and docs/notes.md say why\n"
        "x = 'report.md'  # written beside index.html\n"
    )
    present = repository_markdown(tmp_path)
    assert missing_documents(source, tmp_path, present) == [
        "module.py:1 DESIGN",
        "module.py:2 docs/notes.md",
        "module.py:3 report.md",
    ]
    (tmp_path / "DESIGN.md").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("")
    assert missing_documents(source, tmp_path, repository_markdown(tmp_path)) == [
        "module.py:3 report.md"
    ]
