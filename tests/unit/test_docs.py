"""Docs are part of the product: every code block in README.md and docs/*.md is checked as written.

What is done with each block is data: ``tests/_docblocks.py``, DECISIONS (a reason for every block
that is not run). Blocks that need ranks run in tests/distributed/test_doc_blocks.py.
"""

import doctest
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lookahead_dist.lookahead
from tests._docblocks import (
    ARGV,
    COMPILE,
    CONSOLE,
    DECISIONS,
    DOC_FILES,
    JSON,
    RANKS,
    ROOT,
    RUN,
    TEXT,
    block_env,
    chains,
    collect,
    commands,
    python_argv,
    run_python,
)

BLOCKS = collect()
_RUN = {k: code for k, code in chains(BLOCKS).items() if DECISIONS[k]["kind"] == RUN}


def _id(key):
    return f"{key[0]}:{key[1][:40]}"


def test_every_block_has_a_decision():
    missing = [f"{b.file}:{b.line} ({b.lang or 'untagged'}) first line {k[1]!r}"
               for k, b in BLOCKS.items() if k not in DECISIONS]
    assert not missing, ("code blocks without a decision in tests/_docblocks.py DECISIONS (run it, or say why "
                         "not):\n" + "\n".join(missing))
    stale = [k for k in DECISIONS if k not in BLOCKS]
    assert not stale, f"DECISIONS name blocks that no longer exist (update the first line): {stale}"
    for key, d in DECISIONS.items():
        lang = BLOCKS[key].lang
        assert lang in {RUN: ("python",), RANKS: ("python",), COMPILE: ("python",), ARGV: ("bash",),
                             CONSOLE: ("",), JSON: ("json",), TEXT: ("", "bibtex")}[d["kind"]], (key, lang)
        if d["kind"] in (COMPILE, ARGV, TEXT):
            assert d.get("why"), f"{key}: a block that is not run needs a reason"


@pytest.mark.parametrize("key", list(_RUN), ids=_id)
def test_python_block_runs(key, tmp_path, monkeypatch):
    if DECISIONS[key].get("inproc"):  # plain torch, no global state: exec'd here, saving an interpreter start
        monkeypatch.chdir(tmp_path)
        exec(compile(_RUN[key], f"{key[0]}:{BLOCKS[key].line}", "exec"), {"__name__": "__main__"})
    else:
        run_python(_RUN[key], tmp_path, timeout=240)
    if key == ("README.md", "import torch"):
        assert (tmp_path / "opt.pt").exists()  # the example's checkpoint


@pytest.mark.parametrize("key", [k for k, d in DECISIONS.items() if d["kind"] == COMPILE], ids=_id)
def test_python_block_compiles(key):
    compile(BLOCKS[key].code, f"{key[0]}:{BLOCKS[key].line}", "exec")


def _extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def test_bash_commands_parse():
    argvs, where = [], []
    for key, d in DECISIONS.items():
        if d["kind"] != ARGV:
            continue
        cmds = commands(BLOCKS[key])
        assert cmds, key
        for cmd in cmds:
            target = python_argv(cmd)
            if target is not None:
                argvs.append(target[0])
                where.append(f"{key[0]}:{BLOCKS[key].line}: {cmd}")
                continue
            m = re.match(r"pip install -e '?\.(?:\[([\w,-]+)\])?'?$", cmd)
            if m:
                unknown = set((m.group(1) or "").split(",")) - {""} - _extras()
                assert not unknown, f"{key[0]}: {cmd!r}: no extra {unknown} in pyproject.toml"
                continue
            script = ROOT / cmd.split()[0]
            assert script.is_file() and script.stat().st_mode & 0o111, f"{key[0]}: {cmd!r}: not a script of the repo"
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "_argvcheck.py"), json.dumps(argvs)], cwd=ROOT,
                         env=block_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    bad = [f"{w}\n    {r}" for w, r in zip(where, results) if r is not None]
    assert not bad, "documented commands that do not parse:\n" + "\n".join(bad)


@pytest.mark.parametrize("key", [k for k, d in DECISIONS.items() if d["kind"] == CONSOLE], ids=_id)
def test_console_block_prints_what_it_shows(key):
    lines = BLOCKS[key].code.splitlines()
    cmd, shown, i = [], [], 0
    while i < len(lines):
        if lines[i].startswith("$ "):
            c = lines[i][2:]
            while c.endswith("\\"):
                i += 1
                c = c + "\n" + lines[i]  # bash joins the lines itself
            cmd.append(c)
        else:
            shown.append(lines[i])
        i += 1
    env = block_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    out = subprocess.run(["bash", "-c", "\n".join(cmd)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines() == [s for s in shown if s.strip()]


@pytest.mark.parametrize("key", [k for k, d in DECISIONS.items() if d["kind"] == JSON], ids=_id)
def test_json_block_is_the_shipped_config(key):
    fragment = json.loads("{" + BLOCKS[key].code + "}")
    shipped = json.loads((ROOT / DECISIONS[key]["config"]).read_text())
    for k, v in fragment.items():
        assert shipped.get(k) == v, f"{key[0]} shows {k}={v}, {DECISIONS[key]['config']} has {shipped.get(k)}"


def _anchors(md: Path) -> set[str]:
    out = set()
    for line in md.read_text().splitlines():
        m = re.match(r"^#+\s+(.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower().replace("`", "")).replace(" ", "-")
            out.add(slug)
    return out


def test_links_resolve_inside_the_repository():
    bad = []
    for md in DOC_FILES:
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.is_relative_to(ROOT) or not dest.exists():
                bad.append(f"{md.relative_to(ROOT)}: ({target}) is not a file of the repository")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{md.relative_to(ROOT)}: ({target}) has no heading #{anchor}")
    assert not bad, "\n".join(bad)


def test_no_pointer_outside_the_repository():
    """Docs name repository files (backticked paths under the top-level folders exist) and nothing
    outside it (no absolute paths to this machine, no shared/ notes)."""
    bad = []
    tops = ("src/", "launch/", "tests/", "benchmarks/", "tools/", "docs/", ".ci/")
    for md in DOC_FILES:
        text = md.read_text()
        for m in re.finditer(r"(/work/|/home/|\bshared/|peers\.md)", text):
            bad.append(f"{md.relative_to(ROOT)}: mentions {m.group(0)!r} (not in this repository)")
        for p in re.findall(r"`([\w./-]+)`", text):
            if p.startswith(tops) and not re.search(r"[<>*{}]", p):
                p = p.split("::")[0]
                if not (ROOT / p).exists() and not (md.parent / p).exists():
                    bad.append(f"{md.relative_to(ROOT)}: `{p}` does not exist")
    assert not bad, "\n".join(bad)


def test_docstring_examples():
    result = doctest.testmod(lookahead_dist.lookahead, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_readme_names_two_commands_that_exist():
    readme = (ROOT / "README.md").read_text()
    for cmd in ("./launch/demo.sh", "./launch/test.sh"):
        assert cmd in readme and (ROOT / cmd).exists()
    assert "launch/test.sh" in (ROOT / ".ci" / "run").read_text()
