"""Checkpoints of local SGD across nodes under DeepSpeed resume exactly (Note [Checkpoints across nodes]).

``lookahead_dist.deepspeed.initialize`` with ``"local_sgd": {"across": "nodes"}`` on 2 "nodes" x 1 rank
and 2 "nodes" x 2 ranks (``LOCAL_WORLD_SIZE``), ZeRO-2 and ZeRO-3 (several sub-groups), AdamW
(``torch_adam``), k=3 with outer momentum. A first set of processes trains 8 steps without stopping and,
after step 4 (mid-cycle, the nodes' replicas apart), calls ``engine.save_checkpoint`` twice: into one
directory shared by the nodes, and into a directory of each node's own. New processes load each with
``engine.load_checkpoint(dir)`` -- no tag -- and train steps 5 to 8: every rank's module weights must
equal, bit for bit, those of the run that never stopped. The resuming processes also check what a
wrong directory gives: none of the nodes with a checkpoint, (None, None) on every rank; one node
without it, a RuntimeError on every rank; a checkpoint saved without node directories, an error
naming the call that loads it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import torch

from tests.distributed._spawn_warm import run_ranks

pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

MICRO, STEPS, SAVE_AT = 2, 8, 4
K, ALPHA, BETA = 3, 0.7, 0.5
D_IN, D_HID, D_OUT = 4, 6, 2

CASES = {
    "zero2": {"stage": 2},
    "zero3": {"stage": 3, "sub_group_size": 20, "stage3_param_persistence_threshold": 0},
}


def _config(zero: dict[str, Any], per_node: int) -> dict[str, Any]:
    return {
        "train_batch_size": per_node * MICRO,  # one node's batch
        "train_micro_batch_size_per_gpu": MICRO,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.02, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": zero,
        "lookahead": {"k": K, "alpha": ALPHA,
                      "local_sgd": {"across": "nodes", "outer_momentum": BETA, "nesterov": True}},
        "steps_per_print": 10**9,
    }


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(MICRO, D_IN, generator=g), torch.randn(MICRO, D_OUT, generator=g)


def _engine(zero: dict[str, Any], per_node: int, rank: int):
    from lookahead_dist.deepspeed import initialize

    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.Tanh(), torch.nn.Linear(D_HID, D_OUT))
    engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=_config(zero, per_node))
    return engine


def _train(engine, rank: int, steps: range) -> None:
    for step in steps:
        x, y = _batch(step, rank)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()


def _weights(engine) -> list[list[float]]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().float().reshape(-1).tolist() for p in params]


def _setup(rank: int, per_node: int) -> int:
    os.environ["LOCAL_WORLD_SIZE"] = str(per_node)  # _spawn runs one "node" of all ranks: split it
    os.environ["LOCAL_RANK"] = str(rank % per_node)
    from lookahead_dist.deepspeed import skip_cpu_shm_kernel

    skip_cpu_shm_kernel()
    return rank // per_node


def _uninterrupted(rank: int, world: int, per_node: int, tmp: str) -> dict[str, Any]:
    node = _setup(rank, per_node)
    out = {}
    for name, zero in CASES.items():
        engine = _engine(zero, per_node, rank)
        _train(engine, rank, range(SAVE_AT))
        engine.save_checkpoint(os.path.join(tmp, name, "shared"))            # one directory for all nodes
        engine.save_checkpoint(os.path.join(tmp, name, f"own{node}"))        # a directory per node
        saved = _weights(engine)
        _train(engine, rank, range(SAVE_AT, STEPS))
        out[name] = {"saved": saved, "final": _weights(engine)}
    return out


def _resumed(rank: int, world: int, per_node: int, tmp: str) -> dict[str, Any]:
    node = _setup(rank, per_node)
    out: dict[str, Any] = {}
    for name, zero in CASES.items():
        for layout in ("shared", "own"):
            engine = _engine(zero, per_node, rank)
            if (name, layout) == ("zero2", "shared"):  # wrong directories first: nothing may be loaded
                from lookahead_dist.deepspeed import _node_dir

                out["node_dir"] = _node_dir(engine, "ckpt")  # where la_ds.load_checkpoint looks
                out["empty"] = engine.load_checkpoint(os.path.join(tmp, "empty"))
                for bad in ("partial", "legacy"):
                    try:
                        engine.load_checkpoint(os.path.join(tmp, bad))
                        out[bad] = None
                    except (RuntimeError, FileNotFoundError) as e:
                        out[bad] = f"{type(e).__name__}: {e}"
            path, _ = engine.load_checkpoint(os.path.join(tmp, name, "shared" if layout == "shared" else f"own{node}"))
            steps = engine.global_steps
            _train(engine, rank, range(SAVE_AT, STEPS))
            out[name, layout] = {"path": path, "global_steps": steps, "final": _weights(engine)}
    return out


def _max_err(a: list[list[float]], b: list[list[float]]) -> float:
    return max(float((torch.tensor(x) - torch.tensor(y)).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("nodes, per_node", [(2, 1), (2, 2)], ids=["2x1", "2x2"])
def test_node_checkpoints_resume_exactly(tmp_path, nodes, per_node):
    world = nodes * per_node
    tmp = str(tmp_path)
    ref = run_ranks(_uninterrupted, world, args=(per_node, tmp), timeout=280)

    for name in CASES:
        # Mid-cycle the nodes' replicas differ: a node resumed from the other's files would go wrong.
        assert _max_err(ref[0][name]["saved"], ref[per_node][name]["saved"]) > 1e-4, name
        assert _max_err(ref[0][name]["final"], ref[per_node][name]["final"]) > 1e-4, name
        for n in range(nodes):  # node n's files under <dir>/node<n>, each with its own latest
            for d in ("shared", f"own{n}"):
                folder = tmp_path / name / d / f"node{n}"
                assert (folder / "latest").read_text() == f"global_step{SAVE_AT}", folder
                zero_files = sorted(p.name for p in (folder / f"global_step{SAVE_AT}").glob("*optim_states.pt"))
                assert len(zero_files) == per_node, (folder, zero_files)
        assert sorted(p.name for p in (tmp_path / name / "shared").iterdir()) == [f"node{n}" for n in range(nodes)]

    (tmp_path / "empty").mkdir()
    shutil.copytree(tmp_path / "zero2" / "shared" / "node0", tmp_path / "partial" / "node0")  # node 1's is missing
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "latest").write_text("global_step4")  # as DeepSpeed's own save_checkpoint writes it

    got = run_ranks(_resumed, world, args=(per_node, tmp), timeout=280)
    for rank, res in enumerate(got):
        assert res["node_dir"] == os.path.join("ckpt", f"node{rank // per_node}"), rank
        assert res["empty"] == (None, None), rank
        assert res["partial"] is not None and res["partial"].startswith("RuntimeError"), (rank, res["partial"])
        assert "node 1: no checkpoint" in res["partial"] and "node 0: 'global_step4'" in res["partial"], res["partial"]
        assert res["legacy"] is not None and "type(engine).load_checkpoint" in res["legacy"], (rank, res["legacy"])
        for name in CASES:
            for layout in ("shared", "own"):
                r = res[name, layout]
                assert r["path"] is not None and r["global_steps"] == SAVE_AT, (name, layout, rank, r["path"])
                err = _max_err(r["final"], ref[rank][name]["final"])
                assert err == 0.0, f"{name} {layout} rank {rank}: resumed run differs from the uninterrupted one by {err:.3g}"
