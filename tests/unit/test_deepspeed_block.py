"""The DeepSpeed ``"lookahead"`` block: mistakes found at ``initialize``, before any engine or process group.

Each test is what a user writes: a model, a DeepSpeed config dict with (or nearly with) the block,
``lookahead_dist.deepspeed.initialize`` or ``lookahead_dist.accelerate``'s reading of the same
config. The ones that need ranks (one node across nodes, local SGD at stage 0, resuming with
another k) are in ``tests/distributed/test_deepspeed_user_errors.py``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _config(**extra) -> dict:
    return {"train_batch_size": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": 1}, **extra}


def _initialize(config: dict) -> None:
    import lookahead_dist.deepspeed as la_ds

    model = torch.nn.Linear(4, 2)
    la_ds.initialize(model=model, model_parameters=model.parameters(), config=config)


@pytest.mark.parametrize("name", ["lookahaed", "LookAhead", "look_ahead", "lookahead ", "Look-Ahead", "lookahed"])
def test_misspelled_block_name_is_an_error(name):
    with pytest.raises(ValueError, match=f"DeepSpeed config key '{name}' looks like a misspelled \"lookahead\""):
        _initialize(_config(**{name: {"k": 5, "alpha": 0.5}}))


@pytest.mark.parametrize("name", ["lookahaed", "LOOKAHEAD"])
def test_misspelled_block_name_under_accelerate(name):
    from lookahead_dist.accelerate import (
        _prepare_deepspeed_config,
        lookahead_config_from,
    )

    with pytest.raises(ValueError, match="looks like a misspelled"):
        lookahead_config_from(_config(**{name: {"k": 5}}))
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2}, name: {"k": 5}})
    with pytest.raises(ValueError, match="looks like a misspelled"):
        _prepare_deepspeed_config(plugin, [torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)])


def test_other_deepspeed_keys_are_not_taken_for_the_block():
    from deepspeed.runtime import constants

    from lookahead_dist.deepspeed import _check_block_name

    keys = {v: {} for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and v.isidentifier()}
    assert len(keys) > 30
    _check_block_name(keys)  # no DeepSpeed key is near "lookahead"


@pytest.mark.parametrize("block, words", [
    ({"K": 5}, "'K' -> 'k'"),
    ({"k": 5, "alhpa": 0.5}, "'alhpa' -> 'alpha'"),
    ({"local-sgd": False}, "'local-sgd' -> 'local_sgd'"),
    ({"local_sgd": {"across": "nodes", "num_fragment": 2}}, "'num_fragment' -> 'num_fragments'"),
])
def test_unknown_key_in_block_names_the_likely_one(block, words):
    with pytest.raises(ValueError, match="unknown key") as info:
        _initialize(_config(lookahead=block))
    assert f"(did you mean: {words}?)" in str(info.value)


@pytest.mark.parametrize("local_sgd, words", [
    ({"across": "nodes", "num_fragments": 2}, "`num_fragments=2` needs k"),
    ({"across": "nodes", "num_fragments": 5, "fragment_sync_delay": 1},
     "`fragment_sync_delay=1` must be < k / num_fragments = 5 / 5 = 1"),
    ({"across": "nodes", "fragment_sync_delay": 5}, "`fragment_sync_delay=5` must be <"),
])
def test_fragment_schedule_is_checked_at_initialize(local_sgd, words):
    # before this check the same block failed at the first engine.step()
    with pytest.raises(ValueError, match='"lookahead.local_sgd" does not fit "lookahead.k" = 5') as info:
        _initialize(_config(lookahead={"k": 5, "local_sgd": local_sgd}))
    assert words in str(info.value)


def test_local_sgd_true_one_rule_for_deepspeed_and_accelerate():
    from lookahead_dist.accelerate import _prepare_deepspeed_config

    config = _config(lookahead={"k": 5, "local_sgd": True}, zero_optimization={"stage": 2})
    with pytest.raises(ValueError, match="needs ZeRO stage 0, got stage 2") as ds:
        _initialize(config)
    plugin = SimpleNamespace(deepspeed_config={key: v for key, v in config.items() if key != "optimizer"})
    with pytest.raises(ValueError) as acc:
        _prepare_deepspeed_config(plugin, [torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)])
    assert str(acc.value) == str(ds.value)


def test_op_build_notice(monkeypatch, capsys):
    import deepspeed

    import lookahead_dist.deepspeed as la_ds

    assert la_ds._op_for_optimizer(_config()) is None  # torch_adam: nothing to build
    assert la_ds._op_for_optimizer({"optimizer": {"type": "Adam"}}) == "fused_adam"
    assert la_ds._op_for_optimizer({"optimizer": {"type": "adamw"},
                                    "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}) == "cpu_adam"
    assert la_ds._op_for_optimizer({"optimizer": {"type": "Adagrad"}}) is None
    for name in la_ds._OP_BUILDERS:  # the real check runs (True, False or None) without building anything
        assert la_ds._op_is_built(name) in (True, False, None)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    import lookahead_dist.deepspeed.op_build as op_build  # where initialize's notice looks these up

    monkeypatch.setattr(op_build, "_op_is_built", lambda name: False)
    monkeypatch.setattr(op_build, "_ops_noticed", set())
    monkeypatch.setattr(deepspeed, "initialize", stop)
    config = _config(optimizer={"type": "AdamW", "params": {"lr": 1e-3}}, lookahead={"k": 5})
    for _ in range(2):
        with pytest.raises(Stop):
            _initialize(config)
    err = capsys.readouterr().err
    assert err.count("[lookahead_dist] DeepSpeed will build its fused_adam op") == 1, err
    assert "first run only, about 1-3 minutes" in err


# -- across nodes under optimizer offload ------------------------------------------------------------
@pytest.mark.parametrize("offload, backend", [(None, None), ({"device": "none"}, None), ({"device": "cpu"}, "gloo"),
                                              ({"device": "nvme"}, "gloo")])
def test_across_node_groups_use_gloo_under_optimizer_offload(offload, backend):
    # Offloaded fp32 partitions are CPU tensors: NCCL cannot reduce them, so the across-node
    # groups local SGD averages over are built on gloo (the world's backend otherwise).
    from lookahead_dist.deepspeed import inter_node_backend

    zero = {"stage": 2} if offload is None else {"stage": 2, "offload_optimizer": offload}
    assert inter_node_backend(_config(zero_optimization=zero)) == backend


def test_node_groups_builds_the_inter_groups_on_the_backend_asked(one_rank_group, monkeypatch):
    import torch.distributed as dist

    from lookahead_dist.deepspeed import node_groups

    seen = []
    real = dist.new_subgroups_by_enumeration

    def record(ranks, timeout=None, backend=None, pg_options=None):
        seen.append(backend)
        return real(ranks, timeout=timeout, backend=backend, pg_options=pg_options)

    monkeypatch.setattr(dist, "new_subgroups_by_enumeration", record)
    with pytest.warns(UserWarning, match="found 1 node"):
        groups = node_groups(1, inter_backend="gloo")
    assert seen == [None, "gloo"] and dist.get_backend(groups.inter) == "gloo"


def test_eager_and_sparse_keys_of_the_across_nodes_block():
    from lookahead_dist.deepspeed.config import _parse_local_sgd

    parsed = _parse_local_sgd({"across": "nodes", "eager_update": True, "comm_dtype": "int2", "topk_fraction": 0.02,
                               "num_fragments": 2})
    o = parsed["options"]
    assert (o.eager_update, o.topk_fraction, o.comm_dtype, o.num_fragments) == (True, 0.02, "int2", 2)
    assert _parse_local_sgd({"across": "nodes", "eager_update": "naive"})["options"].eager_update == "naive"
    with pytest.raises(ValueError, match=r'"lookahead.local_sgd": LocalSGDOptions `topk_fraction=0.02`'):
        _parse_local_sgd({"across": "nodes", "topk_fraction": 0.02})
    with pytest.raises(ValueError, match="'eager_updates' -> 'eager_update'"):
        _parse_local_sgd({"across": "nodes", "eager_updates": True})


def test_fused_kernels_key_of_the_across_nodes_block():
    from lookahead_dist.deepspeed.config import _parse_local_sgd

    o = _parse_local_sgd({"across": "nodes", "comm_dtype": "int4", "fused_kernels": True})["options"]
    assert (o.fused_kernels, o.comm_dtype) == (True, "int4")
    with pytest.raises(ValueError, match=r'"lookahead.local_sgd": LocalSGDOptions `fused_kernels=True`.*comm_dtype=None'):
        _parse_local_sgd({"across": "nodes", "fused_kernels": True})
    with pytest.raises(ValueError, match="'fused_kernel' -> 'fused_kernels'"):
        _parse_local_sgd({"across": "nodes", "comm_dtype": "int8", "fused_kernel": True})
