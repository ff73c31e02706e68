"""init_distributed's reading of launcher environments, and the accelerate adapter's config checks.

The real launches (torchrun, mpiexec, accelerate launch) are in tests/distributed/test_launchers.py
and tests/mpi/; these pin the decisions on each environment without starting processes.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from lookahead_dist import Lookahead
from lookahead_dist.distributed import LaunchInfo, detect_launch, init_distributed

LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE",
               "MPI_LOCALRANKID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
               "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "PMIX_RANK"]


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    yield monkeypatch
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("env, want", [
    ({}, LaunchInfo("single", 0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, LaunchInfo("env", 3, 4, 1)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, LaunchInfo("mpi", 1, 2, 1)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     LaunchInfo("mpi", 2, 4, 0)),
    ({"PMIX_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, LaunchInfo("mpi", 1, 2, 1)),
    # torchrun inside an MPI allocation: torchrun's variables win (they describe this process).
    ({"RANK": "0", "WORLD_SIZE": "2", "PMI_RANK": "5", "PMI_SIZE": "8"}, LaunchInfo("env", 0, 2, 0)),
])
def test_detect_launch(clean_env, env, want):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert detect_launch() == want


def test_bad_environment_and_backend_are_named(clean_env):
    clean_env.setenv("PMI_RANK", "one")
    clean_env.setenv("PMI_SIZE", "2")
    with pytest.raises(ValueError, match="PMI_RANK='one'"):
        detect_launch()
    with pytest.raises(ValueError, match="backend.*'ncll'"):
        init_distributed("ncll")


def test_single_process_gets_a_one_rank_group(clean_env):
    assert init_distributed() == (0, 1)
    t = torch.ones(2)
    dist.all_reduce(t)  # collectives work on the one-rank group
    assert t.tolist() == [1.0, 1.0] and dist.get_backend() == "gloo"


def test_mpi_environment_with_master_set_needs_no_mpi4py(clean_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"PMI_RANK": "0", "PMI_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        clean_env.setenv(k, v)
    assert init_distributed("gloo") == (0, 1)
    import os
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")


def test_env_launch_without_master_is_an_error(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR/MASTER_PORT"):
        init_distributed()


# -- the accelerate adapter's DeepSpeed config decisions (no accelerate process needed) ---------------
def _plugin(**config):
    base = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}
    return SimpleNamespace(deepspeed_config={**base, **config})


def _adamw():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)


def test_offload_swap_is_handled_or_refused():
    from lookahead_dist.accelerate import _prepare_deepspeed_config

    offload = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    # Unset (accelerate's default would swap): set to false, with a warning saying so.
    plugin = _plugin(zero_optimization=offload)
    objs = [Lookahead(_adamw())]
    with pytest.warns(UserWarning, match="zero_force_ds_cpu_optimizer"):
        _prepare_deepspeed_config(plugin, objs)
    assert plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] is False
    # Explicitly true: the user asked for the swap; refused, naming the setting.
    plugin = _plugin(zero_optimization=offload, zero_force_ds_cpu_optimizer=True)
    with pytest.raises(ValueError, match='"zero_force_ds_cpu_optimizer": true'):
        _prepare_deepspeed_config(plugin, [Lookahead(_adamw())])
    # No Lookahead, no offload: nothing touched.
    plugin = _plugin(zero_optimization=offload)
    _prepare_deepspeed_config(plugin, [_adamw()])
    assert "zero_force_ds_cpu_optimizer" not in plugin.deepspeed_config


def test_lookahead_block_wraps_and_is_validated():
    from lookahead_dist.accelerate import _prepare_deepspeed_config

    objs = ["model", _adamw()]
    _prepare_deepspeed_config(_plugin(lookahead={"k": 3, "alpha": 0.25, "pullback": "reset"}), objs)
    assert isinstance(objs[1], Lookahead) and objs[0] == "model" and objs[1].pullback == "reset"
    assert (objs[1].defaults["lookahead_k"], objs[1].defaults["lookahead_alpha"]) == (3, 0.25)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['kk'\]"):
        _prepare_deepspeed_config(_plugin(lookahead={"kk": 3}), [_adamw()])
    with pytest.raises(ValueError, match="lookahead.alpha"):
        _prepare_deepspeed_config(_plugin(lookahead={"alpha": 1.5}), [_adamw()])
    with pytest.raises(TypeError, match="local_sgd"):
        _prepare_deepspeed_config(_plugin(lookahead={"local_sgd": "yes"}), [_adamw()])
    with pytest.raises(ValueError, match="in one place"):
        _prepare_deepspeed_config(_plugin(lookahead={"k": 3}), [Lookahead(_adamw())])
    with pytest.raises(ValueError, match='"optimizer" block'):
        _prepare_deepspeed_config(_plugin(lookahead={"k": 3}, optimizer={"type": "AdamW"}), [_adamw()])
    # Local SGD under a partitioning stage is refused before anything is built.
    with pytest.raises(ValueError, match="ZeRO stage 0, got stage 2"):
        _prepare_deepspeed_config(_plugin(lookahead={"local_sgd": True}), [_adamw()])


def test_shipped_deepspeed_json_has_a_valid_block():
    import json
    from pathlib import Path

    from lookahead_dist.accelerate import parse_lookahead_block

    path = Path(__file__).resolve().parents[2] / "launch" / "deepspeed" / "zero2.json"
    block = parse_lookahead_block(json.loads(path.read_text())["lookahead"])
    assert (block["k"], block["alpha"], block["local_sgd"]) == (5, 0.5, False)
