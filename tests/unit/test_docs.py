"""Docs are part of the product: the README example and the docstring examples must run."""

import doctest
import re
from pathlib import Path

import lookahead_dist.lookahead

ROOT = Path(__file__).resolve().parents[2]


def test_readme_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "opt.pt").exists()


def test_docstring_examples():
    result = doctest.testmod(lookahead_dist.lookahead, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_readme_names_two_commands_that_exist():
    readme = (ROOT / "README.md").read_text()
    for cmd in ("./launch/demo.sh", "./launch/test.sh"):
        assert cmd in readme and (ROOT / cmd).exists()
    assert "launch/test.sh" in (ROOT / ".ci" / "run").read_text()
