"""Prompt files and the built-in prompts."""

import pytest

from qvd_bench.errors import UserError
from qvd_bench.prompts import DEFAULT_PROMPTS, read_prompts, select_prompts


def test_default_prompts_are_distinct_and_non_empty():
    assert len(DEFAULT_PROMPTS) >= 8
    assert len(set(DEFAULT_PROMPTS)) == len(DEFAULT_PROMPTS)
    assert all(p.strip() == p and p for p in DEFAULT_PROMPTS)


def test_read_prompts_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# a comment\n\n  a dog runs on the beach  \n   # indented comment\nsnow falls, slowly\r\n\n",
        encoding="utf-8",
    )
    assert read_prompts(path) == ["a dog runs on the beach", "snow falls, slowly"]
    assert read_prompts(str(path)) == read_prompts(path)


def test_read_prompts_keeps_non_ascii_text(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("un café à Paris\n", encoding="utf-8")
    assert read_prompts(path) == ["un café à Paris"]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(UserError, match="nope.txt"):
        read_prompts(path)


def test_unreadable_file_names_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        read_prompts(tmp_path)  # a directory
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="binary.txt"):
        read_prompts(binary)


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n  # comments\n"])
def test_file_without_prompts_is_an_error(tmp_path, text):
    path = tmp_path / "empty.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=r"prompt file .*empty.txt has no prompts"):
        read_prompts(path)


def test_select_prompts_defaults_and_files(tmp_path):
    assert select_prompts(None, 2) == list(DEFAULT_PROMPTS[:2])
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert select_prompts(path, 2) == ["one", "two"]
    # Fewer prompts than samples: repeated in order.
    assert select_prompts(path, 5) == ["one", "two", "three", "one", "two"]
    assert len(select_prompts(None, 20)) == 20


def test_select_prompts_rejects_a_non_positive_count():
    with pytest.raises(UserError, match="at least 1"):
        select_prompts(None, 0)
