"""Ranks that never drift apart (issue: GradScaler skips and DCP templates under local SGD).

One 2-rank spawn runs the GradScaler scenario, two more the DCP save and the resume in fresh
processes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lookahead_dist import OUTER_MOMENTUM_KEY, Lookahead, LocalSGDOptions
from tests.distributed._spawn import run_ranks

pytestmark = pytest.mark.distributed

K = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def batch(rank: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * (rank + 1) + t)
    return torch.randn(4, 6, generator=g), torch.randn(4, 4, generator=g)


def flat(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def _grad_scaler_body(rank: int, world_size: int) -> dict:
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), k=K, alpha=0.5,
                    local_sgd=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    paired = []
    after_sync = []
    for t in range(1, 10):  # 9 calls, k=3: syncs at calls 3, 6, 9
        opt.zero_grad()
        x, y = batch(rank, t)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if rank == 1 and t == 2:  # an overflow on rank 1 only, at step 2 only
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        # A collective the training loop issues between syncs (e.g. a logged loss): it must pair
        # with the same call on the other rank, not with a sync.
        tag = torch.tensor([float(t)])
        dist.all_reduce(tag)
        paired.append(tag.item())
        if t % K == 0:
            after_sync.append(flat(model))
    return {"paired": paired, "after_sync": after_sync, "scale": scaler.get_scale()}


def test_grad_scaler_skip_on_one_rank_keeps_syncs_in_lockstep():
    r0, r1 = run_ranks(_grad_scaler_body, world_size=2, timeout=120)
    assert r0["paired"] == [2.0 * t for t in range(1, 10)]
    assert r0["paired"] == r1["paired"]
    assert len(r0["after_sync"]) == 3
    for a, b in zip(r0["after_sync"], r1["after_sync"]):
        assert a == b, "the replicas differ right after a sync"
    # The overflow lowered rank 1's scale only: rank 0 never overflowed.
    assert r0["scale"] == 2.0**8 and r1["scale"] == 2.0**7


# -- DCP: outer momentum exists before the first sync, and a resume is exact -----------------------
def _train(model, opt, start: int, stop: int, rank: int) -> None:
    for t in range(start, stop):
        opt.zero_grad()
        x, y = batch(rank, t)
        F.mse_loss(model(x), y).backward()
        opt.step()


def _build(rank: int):
    # DCP saves one copy of a replicated (non-DTensor) tensor, so a DCP checkpoint of local SGD is
    # exact where every rank holds the same state: right after a sync, with an inner optimizer
    # without per-rank state (plain SGD). docs/local-sgd.md says so; per-rank checkpoints
    # (torch.save or lookahead_dist.checkpointing) have no such limit.
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05), k=K, alpha=0.7,
                    local_sgd=LocalSGDOptions(outer_momentum=0.9, nesterov=True))
    return model, opt


def _dcp_save_body(rank: int, world_size: int, path: str, stop: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _build(rank)
    _train(model, opt, 1, K + 1, rank)  # right after the first sync
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    _train(model, opt, K + 1, stop, rank)  # the uninterrupted run goes on
    return {"final": flat(model)}


def _dcp_load_body(rank: int, world_size: int, path: str, stop: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _build(rank)
    # The template is made before any step: the outer momentum must already have a slot in it.
    msd, osd = get_state_dict(model, opt)
    has_slot = all(OUTER_MOMENTUM_KEY in s for s in osd["state"].values())
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    momentum_nonzero = any(bool(opt.state_entry(p)[OUTER_MOMENTUM_KEY].any()) for p in model.parameters())
    _train(model, opt, K + 1, stop, rank)
    return {"final": flat(model), "has_slot": has_slot, "momentum_nonzero": momentum_nonzero}


def test_dcp_resume_after_first_sync_keeps_outer_momentum(tmp_path):
    path = str(tmp_path / "ckpt")
    stop = 3 * K + 2
    ref = run_ranks(_dcp_save_body, world_size=2, args=(path, stop), timeout=120)
    got = run_ranks(_dcp_load_body, world_size=2, args=(path, stop), timeout=120)
    for r in range(2):
        assert got[r]["has_slot"], "a DCP template made before the first sync has no outer-momentum slot"
        assert got[r]["momentum_nonzero"], "the outer momentum was not restored"
        assert got[r]["final"] == ref[r]["final"]


# -- pickling a communicating Lookahead -----------------------------------------------------------
def _count_hook(optimizer, args, kwargs):  # module level: picklable
    optimizer.defaults["hook_calls"] = optimizer.defaults.get("hook_calls", 0) + 1


def _pickle_body(rank: int, world_size: int) -> dict:
    import pickle

    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05), k=2, local_sgd=LocalSGDOptions(module=model))
    opt.register_step_pre_hook(_count_hook)
    _train(model, opt, 1, 4, rank)
    clone = pickle.loads(pickle.dumps(opt))
    same_state = all(
        torch.equal(a, b) for sa, sb in zip(opt.state_dict()["state"].values(), clone.state_dict()["state"].values())
        for a, b in zip(sa.values(), sb.values()) if isinstance(a, torch.Tensor))
    error = ""
    try:
        clone.step()  # its parameters have no gradients: only the sync schedule runs, and it must refuse
    except RuntimeError as e:
        error = str(e)
    _train(model, opt, 4, 7, rank)  # the original goes on, its groups untouched
    return {"hooks": len(clone._optimizer_step_pre_hooks), "same_state": same_state, "error": error,
            "final": flat(model)}


def test_pickled_local_sgd_lookahead_is_detached_with_a_clear_error():
    r0, r1 = run_ranks(_pickle_body, world_size=2, timeout=120)
    for r in (r0, r1):
        assert r["hooks"] == 1 and r["same_state"]
        assert "unpickled or deep-copied, which drops its process groups" in r["error"]
    assert r0["final"] == r1["final"]  # the original kept its groups: step 6 is a sync
