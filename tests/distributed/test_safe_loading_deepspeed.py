"""Safe loading of DeepSpeed checkpoints (Note [Safe loading] in lookahead_dist._safe_load), on 2
gloo ranks with a ZeRO-2 engine and Lookahead:

- untouched, ``load_latest`` and ``convert_to_universal`` load DeepSpeed's files with the safe
  unpickler and the DeepSpeed allow-list, with no opt-in;
- one DeepSpeed optimizer file rewritten to pickle a call: ``load_latest`` refuses on *both* ranks
  (the files are split between the ranks; the one that found it names the file, the global and
  ``trust_pickle=True``), before DeepSpeed's own loader (``weights_only=False``) sees it; and
  ``convert_to_universal`` refuses before DeepSpeed's converter runs. The payload never runs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed._spawn_warm import run_ranks

pytest.importorskip("deepspeed")

GLOBAL_BATCH = 4


def _write_marker(path: str) -> dict:
    Path(path).write_text("the checkpoint ran code")
    return {}


class _CallsFunction:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def _engine(world: int):
    from lookahead_dist.deepspeed import initialize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    config = {
        "train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.02, "torch_adam": True}},
        "zero_optimization": {"stage": 2}, "lookahead": {"k": 3, "alpha": 0.5}, "steps_per_print": 10**9,
    }
    engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _body(rank: int, world: int, root: str) -> dict:
    import logging

    import deepspeed
    import torch.distributed as dist

    from lookahead_dist.checkpointing import (
        UnsafeCheckpointError,
        load_latest,
        save_checkpoint,
    )
    from lookahead_dist.deepspeed import convert_to_universal

    deepspeed.utils.logger.setLevel(logging.ERROR)
    ckpt, marker = os.path.join(root, "ckpt"), os.path.join(root, "marker")
    engine = _engine(world)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(GLOBAL_BATCH, 5, generator=g)[rank * 2:(rank + 1) * 2]
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    save_checkpoint(ckpt, engine, None, 2)
    out: dict = {}
    # Untouched: loads with no opt-in (the DeepSpeed allow-list covers ZeRO-2's files).
    out["clean_step"] = load_latest(ckpt, _engine(world), None)
    tag = os.path.join(ckpt, "step_00000002")
    if rank == 0:
        convert_to_universal(tag, os.path.join(root, "universal"), inject_missing_state=True)
        out["universal_files"] = len(list(Path(root, "universal", "zero").rglob("lookahead_slow.pt")))
    dist.barrier()
    # Tampered: rank 0's ZeRO optimizer file now pickles a call of _write_marker.
    if rank == 0:
        path = os.path.join(tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        sd = torch.load(path, weights_only=False)
        sd["note"] = _CallsFunction(marker)
        torch.save(sd, path)
    dist.barrier()
    try:
        load_latest(ckpt, _engine(world), None)
        out["load_latest"] = "loaded"
    except UnsafeCheckpointError as exc:
        out["load_latest"] = str(exc)
    from lookahead_dist.deepspeed import load_checkpoint

    try:  # DeepSpeed's own loader unpickles in full: our load_checkpoint checks the tag folder first
        load_checkpoint(_engine(world), ckpt, tag="step_00000002")
        out["load_checkpoint"] = "loaded"
    except UnsafeCheckpointError as exc:
        out["load_checkpoint"] = str(exc)
    if rank == 0:
        shutil.copytree(tag, os.path.join(root, "tampered"))
        try:
            convert_to_universal(os.path.join(root, "tampered"), os.path.join(root, "universal2"),
                                 inject_missing_state=True)
            out["convert"] = "converted"
        except UnsafeCheckpointError as exc:
            out["convert"] = str(exc)
        out["converter_ran"] = os.path.exists(os.path.join(root, "universal2"))
    dist.barrier()
    out["marker"] = os.path.exists(marker)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_tampered_deepspeed_files_are_refused(tmp_path):
    r0, r1 = run_ranks(_body, 2, (str(tmp_path),), timeout=240)
    assert r0["clean_step"] == r1["clean_step"] == 2
    assert r0["universal_files"] == 4  # one slow weight per parameter
    refused = f"{__name__}._write_marker"
    messages = [r0["load_latest"], r1["load_latest"]]
    detailed = [m for m in messages if "zero_pp_rank_0_mp_rank_00_optim_states.pt" in m]
    assert len(detailed) == 1, messages  # the rank that checked that file names it ...
    assert refused in detailed[0] and "load_latest(..., trust_pickle=True)" in detailed[0], detailed[0]
    other = messages[1 - messages.index(detailed[0])]
    assert "refused a file of checkpoint" in other, other  # ... and the other rank raises too
    by_load_checkpoint = [m for m in (r0["load_checkpoint"], r1["load_checkpoint"]) if refused in m]
    assert len(by_load_checkpoint) == 1 and "load_checkpoint(..., trust_pickle=True)" in by_load_checkpoint[0], \
        (r0["load_checkpoint"], r1["load_checkpoint"])
    assert all(m != "loaded" for m in (r0["load_checkpoint"], r1["load_checkpoint"]))
    assert refused in r0["convert"] and "convert_to_universal(..., trust_pickle=True)" in r0["convert"], r0["convert"]
    assert not r0["converter_ran"]
    assert not r0["marker"] and not r1["marker"] and not (tmp_path / "marker").exists()
