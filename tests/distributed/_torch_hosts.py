"""Scenario bodies for the torch-host tests (DDP, ZeroRedundancyOptimizer, FSDP1, FSDP2, HSDP).

Every rank trains a tiny MLP on the same global batches (each rank takes its slice), then reports
what the tests compare: full parameters and slow weights (gathered through the host's own
state-dict path), slow-weight bytes held on this rank, and the collectives counted inside each
``Lookahead.step``. A single-process reference Lookahead run gives the expected trajectory.

Kept apart from the test module so that spawned ranks import it without pytest fixtures, and so
several hosts share one spawn (the suite has a small CPU budget).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from lookahead_dist import SLOW_KEY, STEP_KEY, Lookahead

K = 3
ALPHA = 0.5
STEPS = 3 * K + 2  # ends mid-cycle, so the slow weights differ from the parameters
SAVE_AT = K + 2  # a checkpoint mid-cycle: counter 2 of 3
GLOBAL_BATCH = 8
SIZES = (6, 10, 3)  # odd sizes: uneven Shard(0) chunks and FSDP1 flat-param padding


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.Tanh(), nn.Linear(SIZES[1], SIZES[2]))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, SIZES[0], generator=g), torch.randn(GLOBAL_BATCH, SIZES[2], generator=g)


def local_batch(step: int, dp_rank: int, dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    return x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank]


INNER: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.01),
    "sgdm": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
}
INNER_CLASS = {"adamw": (torch.optim.AdamW, dict(lr=0.05, weight_decay=0.01)),
               "sgdm": (torch.optim.SGD, dict(lr=0.1, momentum=0.9))}


def to_np(d: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in d.items()}


# -- reference --------------------------------------------------------------------------------------
def reference(inner: str, steps: int, *, lookahead: bool = True, fake_first: bool = False,
              pullback: str = "none") -> dict[str, Any]:
    """Single process, full batch. ``fake_first``: one inner step with zero grads and lr 0 first,
    as torch.distributed.checkpoint does, applied to the inner optimizer only (Lookahead must not
    see it as a step)."""
    model = make_model()
    opt_inner = INNER[inner](model.parameters())
    opt = Lookahead(opt_inner, K, ALPHA, pullback=pullback) if lookahead else opt_inner
    if fake_first:
        lrs = [g["lr"] for g in opt_inner.param_groups]
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for g in opt_inner.param_groups:
            g["lr"] = 0.0
        opt_inner.step()
        for g, lr in zip(opt_inner.param_groups, lrs):
            g["lr"] = lr
        opt_inner.zero_grad()
    for t in range(steps):
        x, y = global_batch(t)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    names = [n for n, _ in model.named_parameters()]
    out: dict[str, Any] = {"params": to_np(dict(model.named_parameters()))}
    if lookahead:
        out["slow"] = to_np({n: opt.slow_weight(p) for n, p in model.named_parameters()})
        sd = opt.state_dict()
        out["counter"] = {names[i]: s[STEP_KEY] for i, s in sd["state"].items() if STEP_KEY in s}
    return out


# -- counting collectives ---------------------------------------------------------------------------
_COMM_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd")
_NOT_COMM = {"wait_tensor", "wait"}


class CollectiveCounter(TorchDispatchMode):
    """Counts every communication op that reaches the dispatcher while active.

    ``torch.distributed`` collectives on a ProcessGroup (``c10d.allreduce_``, ``broadcast_``,
    ``_allgather_base_`` ...) and functional collectives (DTensor redistribution, FSDP2) all pass
    through it. DTensor ops are handed back (``NotImplemented``) so that DTensor runs first and its
    own collectives are seen too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented
        packet = getattr(func, "_overloadpacket", None)
        ns = getattr(func, "namespace", "")
        name = getattr(packet, "__name__", str(func))
        if ns in _COMM_NAMESPACES and name not in _NOT_COMM:
            self.calls.append(f"{ns}.{name}")
        return func(*args, **(kwargs or {}))


def count_inner_steps(la: Lookahead) -> list[list[str]]:
    """Record the collectives issued inside each ``la.step`` call (patched on the instance)."""
    log: list[list[str]] = []
    orig = la.step

    def step(*args: Any, **kwargs: Any) -> Any:
        with CollectiveCounter() as c:
            out = orig(*args, **kwargs)
        log.append(c.calls)
        return out

    la.step = step  # type: ignore[method-assign]
    return log


def counter_self_check(rank: int, world_size: int) -> dict[str, int]:
    """The counter must see real collectives: c10d, functional (DTensor) and FSDP2's all-gather."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    seen = {}
    with CollectiveCounter() as c:
        t = torch.ones(3)
        dist.all_reduce(t)
    seen["all_reduce"] = len(c.calls)
    with CollectiveCounter() as c:
        dist.broadcast(torch.ones(3), src=0)
    seen["broadcast"] = len(c.calls)
    mesh = init_device_mesh("cpu", (world_size,))
    d = distribute_tensor(torch.arange(8.0), mesh, [Shard(0)])
    with CollectiveCounter() as c:
        d.full_tensor()
    seen["dtensor_full_tensor"] = len(c.calls)
    m = make_model()
    fully_shard(m, mesh=mesh)
    with CollectiveCounter() as c:
        m(torch.zeros(1, SIZES[0]))
    seen["fsdp2_forward"] = len(c.calls)
    with CollectiveCounter() as c:
        torch.ones(3).add_(1)
    seen["local_op"] = len(c.calls)
    return seen


# -- hosts ------------------------------------------------------------------------------------------
class Host:
    """One distributed setup: the wrapped model, the object stepped by the loop, and the Lookahead."""

    def __init__(self, kind: str, inner: str, rank: int, world_size: int, *, pullback: str = "none",
                 model_state: dict[str, torch.Tensor] | None = None) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.kind, self.inner, self.rank, self.world_size = kind, inner, rank, world_size
        self.dp_rank, self.dp_size = rank, world_size
        model = make_model()
        if model_state is not None:  # ZeroRedundancyOptimizer/DDP resume: load before wrapping
            model.load_state_dict(model_state)
        self.base = model
        self.zero = None
        if kind == "ddp":
            self.model = DDP(model)
            self.la = Lookahead(INNER[inner](self.model.parameters()), K, ALPHA, pullback=pullback)
            self.opt: Any = self.la
        elif kind == "zero":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            cls, kw = INNER_CLASS[inner]
            self.model = DDP(model)
            self.zero = ZeroRedundancyOptimizer(
                self.model.parameters(), optimizer_class=Lookahead.wrap(cls, k=K, alpha=ALPHA), **kw)
            self.la = self.zero.optim
            self.opt = self.zero
        elif kind in ("fsdp1", "fsdp1_orig"):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            self.model = FSDP(model, use_orig_params=(kind == "fsdp1_orig"),
                              auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), device_id=torch.device("cpu"))
            self.la = Lookahead(INNER[inner](self.model.parameters()), K, ALPHA, pullback=pullback)
            self.opt = self.la
        elif kind in ("fsdp2", "hsdp"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            if kind == "fsdp2":
                mesh = init_device_mesh("cpu", (world_size,))
            else:  # 2-D mesh: replicate across the first dim, Shard(0) within the second
                mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
            self.mesh = mesh
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            self.model = model
            self.la = Lookahead(INNER[inner](self.model.parameters()), K, ALPHA, pullback=pullback)
            self.opt = self.la
        else:
            raise ValueError(f"unknown host {kind!r}")
        self.comm_log = count_inner_steps(self.la)
        self.host_comm_log: list[int] = []  # collectives in the host's whole step() (ZeRO broadcasts)

    # one training step on this rank's slice of the global batch
    def train_step(self, t: int) -> None:
        x, y = local_batch(t, self.dp_rank, self.dp_size)
        nn.functional.mse_loss(self.model(x), y).backward()
        with CollectiveCounter() as c:
            self.opt.step()
        self.host_comm_log.append(len(c.calls))
        self.opt.zero_grad()

    def train(self, start: int, stop: int) -> None:
        for t in range(start, stop):
            self.train_step(t)

    # full (unsharded) parameters by name, through DCP's state-dict helpers
    def full_params(self) -> dict[str, np.ndarray]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return to_np(sd)

    def full_slow(self) -> dict[str, np.ndarray] | None:
        """Full slow weights by parameter name, through the host's own path (ZeRO: None off rank 0)."""
        if self.zero is not None:  # the consolidated state dict: ZeroRedundancyOptimizer's checkpoint path
            self.zero.consolidate_state_dict(to=0)
            if self.rank != 0:
                return None
            names = [n for n, _ in self.base.named_parameters()]
            return {names[i]: s[SLOW_KEY].numpy().copy() for i, s in self.zero.state_dict()["state"].items()}
        if self.kind.startswith("fsdp1"):
            # FSDP1's full optimizer state dict with use_orig_params=True aliases every state key to
            # the last one gathered on CPU (torch 2.13; plain AdamW too), so read the slow weights
            # by swapping them into the parameters and gathering those.
            with self.la.use_slow_weights():
                return self.full_params()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(self.model, self.la, options=StateDictOptions(full_state_dict=True))
        return {n: s[SLOW_KEY].detach().cpu().numpy().copy() for n, s in sd["state"].items() if SLOW_KEY in s}

    def report(self) -> dict[str, Any]:
        """Params and slow weights gathered to full size; this rank's counters and slow bytes."""
        return {"params": self.full_params(), "slow": self.full_slow(), "counters": local_counters(self.la),
                "slow_bytes": slow_bytes(self.la), "param_local_bytes": param_local_bytes(self.la)}


def local_counters(la: Lookahead) -> list[int]:
    """Every step counter this rank holds (one per step unit, i.e. per param group here)."""
    entries = list(la.state.values()) + list(la._pending.values())
    return [int(e[STEP_KEY]) for e in entries if STEP_KEY in e]


def _local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t)


def slow_bytes(la: Lookahead) -> int:
    """Bytes of slow weights this rank holds, summed over the real state tensors (local shards)."""
    from lookahead_dist.memory import slow_weight_bytes

    return slow_weight_bytes(la)


def param_local_bytes(la: Lookahead) -> int:
    """Bytes of the parameter tensors (local shards) the inner optimizer steps on this rank."""
    return sum(_local(p).numel() * _local(p).element_size() for g in la.param_groups for p in g["params"])



# -- checkpoints ------------------------------------------------------------------------------------
DCP_HOSTS = ("ddp", "fsdp1_orig", "fsdp2", "hsdp")


def save_checkpoint(host: Host, path: str) -> None:
    """Save through the host's own path: DCP, ZeroRedundancyOptimizer consolidation, FSDP1 full state dict."""
    if host.kind in DCP_HOSTS:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        sd = {"model": get_model_state_dict(host.model),
              "optim": get_optimizer_state_dict(host.model, host.la)}
        dcp.save(sd, checkpoint_id=path)
        return
    if host.kind == "zero":
        host.zero.consolidate_state_dict(to=0)
        if host.rank == 0:
            os.makedirs(path, exist_ok=True)
            torch.save({"model": host.base.state_dict(), "optim": host.zero.state_dict()},
                       os.path.join(path, "ckpt.pt"))
    else:  # FSDP1
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType

        with FSDP.state_dict_type(host.model, StateDictType.FULL_STATE_DICT):
            msd = host.model.state_dict()
            osd = FSDP.optim_state_dict(host.model, host.la)
        if host.rank == 0:
            os.makedirs(path, exist_ok=True)
            torch.save({"model": msd, "optim": osd}, os.path.join(path, "ckpt.pt"))
    dist.barrier()


def load_checkpoint(kind: str, inner: str, rank: int, world_size: int, path: str, *, pullback: str = "none"
                    ) -> tuple[Host, dict[str, Any]]:
    """A fresh host loaded from ``path``; also returns what DCP's fake initialising step left behind."""
    info: dict[str, Any] = {}
    if kind in DCP_HOSTS:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        host = Host(kind, inner, rank, world_size, pullback=pullback)
        info = fake_step_probe(host, lambda: get_optimizer_state_dict(host.model, host.la))
        sd = {"model": get_model_state_dict(host.model), "optim": info.pop("result")}
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(host.model, sd["model"])
        set_optimizer_state_dict(host.model, host.la, sd["optim"])
        return host, info
    ckpt = torch.load(os.path.join(path, "ckpt.pt"), weights_only=False)
    if kind == "zero":
        host = Host(kind, inner, rank, world_size, pullback=pullback, model_state=ckpt["model"])
        host.zero.load_state_dict(ckpt["optim"])
        return host, info
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    host = Host(kind, inner, rank, world_size, pullback=pullback)
    with FSDP.state_dict_type(host.model, StateDictType.FULL_STATE_DICT):
        host.model.load_state_dict(ckpt["model"])
        flat = FSDP.optim_state_dict_to_load(host.model, host.la, ckpt["optim"])
    host.la.load_state_dict(flat)
    return host, info


def fake_step_probe(host: Host, call: Callable[[], Any]) -> dict[str, Any]:
    """Run ``call`` (which makes DCP take its fake step on a fresh optimizer) and record its traces."""
    before = {n: _local(p).detach().clone() for n, p in host.model.named_parameters()}
    result = call()
    la = host.la
    counters, slow_equal, params_equal = [], True, True
    for n, p in host.model.named_parameters():
        st = la.state.get(p, {})
        entry = la._pending.get(p, {})
        if STEP_KEY in st or STEP_KEY in entry:
            counters.append(st.get(STEP_KEY, entry.get(STEP_KEY)))
        s = la.slow_weight(p)
        if s is not None:
            slow_equal &= torch.equal(_local(s), before[n])
        params_equal &= torch.equal(_local(p), before[n])
    return {"result": result, "fake_counters": counters, "fake_slow_is_theta0": slow_equal,
            "fake_params_unchanged": params_equal, "fake_inner_state": bool(la.state)}


# -- phases (one spawn each) ------------------------------------------------------------------------
# (name, host, inner optimizer, pullback)
SCENARIOS_2 = [
    ("ddp", "ddp", "adamw", "none"),
    ("zero", "zero", "adamw", "none"),
    ("fsdp1", "fsdp1", "adamw", "none"),
    ("fsdp1_orig", "fsdp1_orig", "adamw", "none"),
    ("fsdp2", "fsdp2", "adamw", "none"),
    ("fsdp2_sgdm", "fsdp2", "sgdm", "pullback"),
]
FAKE_STEP_HOSTS = ("ddp", "fsdp2")


def _run_and_save(name: str, kind: str, inner: str, pullback: str, rank: int, ws: int, ckpt: str) -> dict:
    host = Host(kind, inner, rank, ws, pullback=pullback)
    host.train(0, SAVE_AT)
    save_checkpoint(host, os.path.join(ckpt, name))
    at_save = host.report()
    host.train(SAVE_AT, STEPS)
    return {**host.report(), "at_save": at_save, "comm": host.comm_log, "host_comm": host.host_comm_log}


def phase_train(rank: int, ws: int, ckpt: str) -> dict[str, Any]:
    """2 ranks: every scenario trains 3k+2 steps, saving mid-cycle; plus the DCP fake-step runs."""
    out: dict[str, Any] = {"counter_check": counter_self_check(rank, ws)}
    for name, kind, inner, pullback in SCENARIOS_2:
        out[name] = _run_and_save(name, kind, inner, pullback, rank, ws, ckpt)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    for kind in FAKE_STEP_HOSTS:  # DCP's fake step on a fresh optimizer, then a full run
        host = Host(kind, "adamw", rank, ws)
        info = fake_step_probe(host, lambda: get_optimizer_state_dict(host.model, host.la))
        del info["result"]
        host.train(0, STEPS)
        out[f"{kind}_fake"] = {**host.report(), **info}
    return out


def phase_resume(rank: int, ws: int, ckpt: str) -> dict[str, Any]:
    """Fresh processes: load each mid-cycle checkpoint and finish the run."""
    out: dict[str, Any] = {}
    for name, kind, inner, pullback in SCENARIOS_2:
        host, info = load_checkpoint(kind, inner, rank, ws, os.path.join(ckpt, name), pullback=pullback)
        after_load = host.report()
        host.train(SAVE_AT, STEPS)
        out[name] = {**host.report(), **info, "after_load": after_load, "comm": host.comm_log}
    # Rolling back a ZeroRedundancyOptimizer that has already synced: its load writes the local
    # optimizer's state entries directly, behind Lookahead's cached tensor lists.
    ckpt_zero = torch.load(os.path.join(ckpt, "zero", "ckpt.pt"), weights_only=False)
    host = Host("zero", "adamw", rank, ws)
    host.train(0, K + 1)
    host.base.load_state_dict(ckpt_zero["model"])
    host.zero.load_state_dict(ckpt_zero["optim"])
    host.train(SAVE_AT, STEPS)
    out["zero_rollback"] = host.report()
    return out


def phase_four(rank: int, ws: int, ckpt: str) -> dict[str, Any]:
    """4 ranks: HSDP on a 2x2 mesh (train, save), and the 2-rank FSDP2 checkpoint resharded to 4."""
    out: dict[str, Any] = {"hsdp": _run_and_save("hsdp", "hsdp", "adamw", "none", rank, ws, ckpt)}
    host, info = load_checkpoint("fsdp2", "adamw", rank, ws, os.path.join(ckpt, "fsdp2"))
    after_load = host.report()
    host.train(SAVE_AT, STEPS)
    out["fsdp2_reshard"] = {**host.report(), **info, "after_load": after_load, "comm": host.comm_log}
    return out


def phase_four_resume(rank: int, ws: int, ckpt: str) -> dict[str, Any]:
    host, info = load_checkpoint("hsdp", "adamw", rank, ws, os.path.join(ckpt, "hsdp"))
    after_load = host.report()
    host.train(SAVE_AT, STEPS)
    return {"hsdp": {**host.report(), **info, "after_load": after_load, "comm": host.comm_log}}
