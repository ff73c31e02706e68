"""The demo's parts in one process: data, model, byte counter, table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from lookahead_dist.demo.commcount import CommCounter
from lookahead_dist.demo.data import load_corpus
from lookahead_dist.demo.model import ModelConfig, TinyLM
from lookahead_dist.demo.report import format_bytes, summary_table


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_corpus_is_python_docs_split_once(corpus):
    assert corpus.train.numel() > 300_000 and corpus.val.numel() > 30_000
    assert corpus.train.dtype == torch.int64 and int(corpus.train.max()) < 256
    text = bytes(corpus.train[:200_000].tolist()).decode("utf-8", errors="replace")
    assert "def " in text and "class " in text
    assert torch.equal(load_corpus().val, corpus.val)  # the split is fixed


def test_rank_shards_tile_the_global_batch(corpus):
    x1, y1 = corpus.batch(3, 8, 16, 0, 1, seed=5)
    parts = [corpus.batch(3, 8, 16, r, 4, seed=5) for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x1)
    assert torch.equal(torch.cat([p[1] for p in parts]), y1)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next bytes
    assert not torch.equal(corpus.batch(4, 8, 16, 0, 1, seed=5)[0], x1)
    assert not torch.equal(corpus.batch(3, 8, 16, 0, 1, seed=6)[0], x1)
    assert not torch.equal(corpus.batch(3, 8, 16, 0, 1, seed=5, split="val")[0], x1)
    with pytest.raises(ValueError, match="global batch 8 is not divisible by world size 3"):
        corpus.batch(0, 8, 16, 0, 3, seed=0)


def test_model_starts_near_uniform_and_learns(corpus):
    torch.manual_seed(0)
    cfg = ModelConfig(seq_len=16, n_layer=1, d_model=32, n_head=2)
    model = TinyLM(cfg)
    x, y = corpus.batch(0, 8, 16, 0, 1, seed=0)
    first = model.loss(x, y)
    assert abs(first.item() - math.log(256)) < 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):  # the same batch: must be memorised
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first.item() - 1.0
    # Tied embeddings: no separate output matrix.
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("head"))


@pytest.mark.parametrize("bad", [{"d_model": 30, "n_head": 4}, {"n_layer": 0}, {"seq_len": 1.5}])
def test_model_config_rejects(bad):
    with pytest.raises(ValueError, match="ModelConfig"):
        ModelConfig(**bad)


def test_comm_counter_counts_at_the_dispatcher_pauses_and_patches_nothing(one_rank_group):
    original = dist.all_reduce
    t = torch.ones(10)  # 40 bytes
    out = torch.empty(10)
    with CommCounter() as comm:
        assert dist.all_reduce is original  # nothing patched
        dist.all_reduce(t)
        dist.distributed_c10d.all_reduce(t)
        # Gathers count their output (the gathered buffer), reduce-scatters their input.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        all_gather(out, t)
        reduce_scatter(out, t)
        assert (comm.calls, comm.payload) == (4, 160)
        assert comm.bytes == 0.0  # one rank sends nothing
        assert set(comm.by_op) == {"all_reduce", "all_gather", "reduce_scatter"}
        with comm.paused():
            dist.all_reduce(t)
        assert comm.calls == 4
        # An object collective is counted as the tensor collectives it is made of.
        dist.all_gather_object([None], {"x": 1})
        assert comm.calls > 4 and set(comm.by_op) == {"all_reduce", "all_gather", "reduce_scatter"}
        comm.reset()
        assert (comm.calls, comm.payload, comm.bytes) == (0, 0, 0.0)
        with pytest.raises(RuntimeError, match="already active"):
            comm.__enter__()
    dist.all_reduce(t)  # after the block: not counted
    assert comm.calls == 0


def test_comm_counter_sees_other_threads_keeps_autograd_and_leaves_no_kernel(one_rank_group):
    import threading

    t = torch.ones(10)  # 40 bytes
    group = dist.group.WORLD.group_name
    x = torch.ones(4, requires_grad=True)
    plain = torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", group))
    with CommCounter() as comm:
        assert "ADInplaceOrView" in torch._C._dispatch_dump("c10d::allreduce_")
        # A worker thread's collective (the quantised reduce, a torchft manager) is counted too.
        worker = threading.Thread(target=dist.all_reduce, args=(t,))
        worker.start()
        worker.join()
        assert (comm.calls, comm.payload) == (1, 40)
        # A functional collective is counted once, and its autograd formula still runs above us.
        y = torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", group))
        assert (comm.calls, comm.payload) == (2, 56)
        assert y.requires_grad and y.grad_fn is not None
        y.sum().backward()
        assert torch.equal(x.grad, torch.ones(4))
    assert plain.requires_grad
    # The kernels are gone after the block: the dispatcher table is as before.
    assert "ADInplaceOrView" not in torch._C._dispatch_dump("c10d::allreduce_")
    assert "ADInplaceOrView" not in torch._C._dispatch_dump("_c10d_functional::all_reduce")


def test_comm_counter_ring_model():
    comm = CommCounter()
    comm._record("all_reduce", "all_reduce", 1000, 2)
    comm._record("all_gather", "all_gather", 1000, 4)
    comm._record("reduce_scatter", "reduce_scatter", 1000, 4)
    comm._record("broadcast", "broadcast", 1000, 4)
    assert comm.by_op == {"all_reduce": 1000.0, "all_gather": 750.0, "reduce_scatter": 750.0, "broadcast": 1000.0}


def test_interface_tx_bytes_reads_the_process_groups_interface(monkeypatch):
    from lookahead_dist.demo.commcount import interface_tx_bytes

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    assert interface_tx_bytes() is None
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    first = interface_tx_bytes()
    assert isinstance(first, int) and first >= 0
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "no-such-interface0")
    assert interface_tx_bytes() is None


def test_table_and_bytes():
    assert format_bytes(1751040) == "1.67 MiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(2048) == "2.00 KiB"
    skipped = {"name": "zero2/lookahead", "config": {}, "skipped": True, "reason": "no deepspeed"}
    text = summary_table([skipped])
    assert "zero2/lookahead" in text and "skipped: no deepspeed" in text
