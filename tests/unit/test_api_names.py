"""Every name docs/api.md documents is importable where the page says it lives.

The page has top-level headings for names of ``lookahead_dist`` (``## `Lookahead(...)` ``), a keys
table (constants of ``lookahead_dist``), and sections for modules (``## `lookahead_dist.X` ``) whose
bullets (``- `name(...)` ``, ``- `Name` ``) and backticked names are that module's. Dotted names
anywhere on the page (``lookahead_dist.a.b``) must resolve too. A rename or a move that the page
does not follow fails here.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
_NAME = r"[A-Za-z_]\w*"
# Methods of the user's objects that module sections mention in prose (`state_dict()` of each extra).
_METHODS = {"state_dict", "load_state_dict"}


def _sections() -> list[tuple[str, str]]:
    parts = re.split(r"^## (.+)$", API, flags=re.M)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts), 2)]


def _documented() -> list[tuple[str, str]]:
    """(module, attribute) pairs the page documents."""
    out: set[tuple[str, str]] = set()
    for heading, body in _sections():
        module = re.fullmatch(r"`(lookahead_dist(?:\.\w+)+)`", heading)
        if module:  # a module section: its bullets' names and the names it calls with arguments
            for name in re.findall(rf"^- `({_NAME})[(`]", body, flags=re.M):
                out.add((module.group(1), name))
            for name in re.findall(rf"`({_NAME})\(", body):  # `predict(...)`
                if name not in _METHODS:
                    out.add((module.group(1), name))
            for name in re.findall(r"`([A-Z][A-Za-z]+)`", body):  # classes named alone: `Link`, `Plan`
                out.add((module.group(1), name))
            continue
        top = re.fullmatch(rf"`({_NAME})\(.*", heading)
        if top:
            out.add(("lookahead_dist", top.group(1)))
        elif heading == "Keys":
            for name in re.findall(r"^\| `([A-Z_]+)` \|", body, flags=re.M):
                out.add(("lookahead_dist", name))
    for dotted in re.findall(r"`(lookahead_dist(?:\.\w+)+)", API):
        module, _, attr = dotted.rpartition(".")
        out.add((module, attr))
    return sorted(out)


DOCUMENTED = _documented()


def test_the_page_documents_names():
    # The parser itself can fail: the page's main names are among those it found.
    assert ("lookahead_dist", "Lookahead") in DOCUMENTED
    assert ("lookahead_dist.checkpointing", "load_latest") in DOCUMENTED
    assert ("lookahead_dist", "SLOW_KEY") in DOCUMENTED
    assert len(DOCUMENTED) >= 20, DOCUMENTED


@pytest.mark.parametrize("module, attr", DOCUMENTED, ids=[f"{m}.{a}" for m, a in DOCUMENTED])
def test_documented_name_is_importable(module, attr):
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError:
        # ``lookahead_dist.a.b`` where ``b`` is a submodule or an attribute of ``a``.
        parent, _, child = module.rpartition(".")
        mod = getattr(importlib.import_module(parent), child)
    if not hasattr(mod, attr):
        importlib.import_module(f"{module}.{attr}")  # a submodule named on the page
    else:
        assert getattr(mod, attr) is not None
