"""The Python blocks of the docs that need ranks, run as written under 2 gloo processes with the
environment torchrun gives its workers. The decisions are in tests/_docblocks.py."""

import pytest

from tests._docblocks import DECISIONS, RANKS, chains, collect, ensure_ops, run_python

BLOCKS = collect()
_RANKED = {k: code for k, code in chains(BLOCKS).items() if DECISIONS[k]["kind"] == RANKS}


@pytest.mark.distributed
@pytest.mark.parametrize("key", list(_RANKED), ids=lambda k: f"{k[0]}:{k[1][:40]}")
def test_block_runs_on_two_ranks(key, tmp_path):
    d = DECISIONS[key]
    ensure_ops(d.get("ops", []))  # built once by launch/test.sh; a direct pytest run builds them here
    outs = run_python(_RANKED[key], tmp_path, ranks=2, nodes=d.get("nodes", 1), timeout=240)
    assert len(outs) == 2
