"""The Python blocks of the docs that need ranks, run as written under 2 gloo processes with the
environment torchrun gives its workers. The decisions are in tests/_docblocks.py."""

import pytest

from tests._docblocks import DECISIONS, RANKS, chains, collect, ops_missing, run_python

BLOCKS = collect()
_RANKED = {k: code for k, code in chains(BLOCKS).items() if DECISIONS[k]["kind"] == RANKS}


@pytest.mark.distributed
@pytest.mark.parametrize("key", list(_RANKED), ids=lambda k: f"{k[0]}:{k[1][:40]}")
def test_block_runs_on_two_ranks(key, tmp_path):
    d = DECISIONS[key]
    missing = ops_missing(d.get("ops", []))
    if missing:
        pytest.skip(f"DeepSpeed would compile {missing} first (minutes); build them once, e.g. by running "
                    f"tests/distributed/test_deepspeed_optimizers.py with LOOKAHEAD_TEST_DS_OPS=1")
    outs = run_python(_RANKED[key], tmp_path, ranks=2, nodes=d.get("nodes", 1), timeout=240)
    assert len(outs) == 2
