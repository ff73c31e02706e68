"""Safe loading of checkpoints (Note [Safe loading] in lookahead_dist._safe_load): a file that
pickles a callable is refused before anything in it runs; our own records need no opt-in; user
types need an explicit one (``safe_globals=[...]`` or ``trust_pickle=True``)."""

from __future__ import annotations

import enum
import os
import shlex
from pathlib import Path

import pytest
import torch

from lookahead_dist import Lookahead
from lookahead_dist.checkpointing import (
    UnsafeCheckpointError,
    check_safe_to_load,
    load_latest,
    save_checkpoint,
)

RANK_FILE = Path("step_00000002") / "rank_0.pt"


def _write_marker(path: str) -> dict:
    """What a tampered file runs, if it is unpickled fully: a harmless, visible side effect."""
    Path(path).write_text("the checkpoint ran code")
    return {}


class _CallsFunction:
    """Pickles as a call of _write_marker(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


class _CallsSystem:
    """Pickles as a call of os.system("touch marker") (a module weights-only loading blocks outright)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


PAYLOADS = {"function": (_CallsFunction, f"{__name__}._write_marker"), "os.system": (_CallsSystem, "system")}


class Phase(enum.Enum):
    WARMUP = 1
    MAIN = 2


class _Curriculum:
    """A user's stateful extra whose state holds a type that is not plain data (an enum)."""

    def __init__(self) -> None:
        self.phase = Phase.WARMUP

    def state_dict(self) -> dict:
        return {"phase": self.phase}

    def load_state_dict(self, sd: dict) -> None:
        self.phase = sd["phase"]


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2), k=3)
    return model, opt


def _saved(root: Path, extra=None):
    model, opt = _setup()
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
    save_checkpoint(root, model, opt, 2, extra)
    return model, opt


def _tamper(path: Path, payload) -> None:
    """Rewrite a checkpoint file with ``payload`` inside (read with the full unpickler: we wrote it)."""
    record = torch.load(path, weights_only=False)
    record["rng"]["note"] = payload
    torch.save(record, path)


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_load_latest_refuses_a_pickled_callable(tmp_path, kind):
    cls, global_name = PAYLOADS[kind]
    marker = tmp_path / "marker"
    _saved(tmp_path / "ckpt")
    _tamper(tmp_path / "ckpt" / RANK_FILE, cls(marker))
    model, opt = _setup(seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsafeCheckpointError, match=r"trust_pickle=True") as info:
        load_latest(tmp_path / "ckpt", model, opt)
    assert not marker.exists(), "loading ran code from the file"
    msg = str(info.value)
    assert global_name in info.value.global_name and global_name in msg and str(RANK_FILE) in msg, msg
    assert "load_latest(..., trust_pickle=True)" in msg
    assert ("safe_globals=[" in msg) == (kind == "function")  # a blocked module cannot be allow-listed
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing was loaded


def test_trust_pickle_unpickles_fully(tmp_path):
    """The opt-in really is full unpickling: the same tampered file's payload runs."""
    marker = tmp_path / "marker"
    saved, _ = _saved(tmp_path / "ckpt")
    _tamper(tmp_path / "ckpt" / RANK_FILE, _CallsFunction(marker))
    model, opt = _setup(seed=1)
    assert load_latest(tmp_path / "ckpt", model, opt, trust_pickle=True) == 2
    assert marker.exists()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved.parameters()))


def test_own_records_need_no_opt_in(tmp_path):
    """Every state our records hold loads with weights_only=True: Lookahead over AdamW (tensor lr),
    torch's LR schedulers (also LambdaLR, OneCycleLR, ReduceLROnPlateau), GradScaler, RNG state."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2)), k=2)
    extra = {"step": torch.optim.lr_scheduler.StepLR(opt, 2), "lam": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
             "one": torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10),
             "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau(opt), "scaler": torch.amp.GradScaler("cpu")}
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    save_checkpoint(tmp_path, model, opt, 3, extra)
    torch.load(tmp_path / "step_00000003" / "rank_0.pt", weights_only=True)  # no allow-list at all
    assert load_latest(tmp_path, model, opt, extra) == 3


def test_user_types_need_an_explicit_opt_in(tmp_path):
    cur = _Curriculum()
    cur.phase = Phase.MAIN
    _saved(tmp_path, {"cur": cur})
    model, opt = _setup()
    fresh = _Curriculum()
    with pytest.raises(UnsafeCheckpointError) as info:
        load_latest(tmp_path, model, opt, {"cur": fresh})
    msg = str(info.value)
    name = f"{__name__}.Phase"
    assert info.value.global_name == name and f"safe_globals=[{name}]" in msg and "trust_pickle=True" in msg, msg
    assert fresh.phase is Phase.WARMUP
    assert load_latest(tmp_path, model, opt, {"cur": fresh}, safe_globals=[Phase]) == 2
    assert fresh.phase is Phase.MAIN
    other = _Curriculum()
    assert load_latest(tmp_path, model, opt, {"cur": other}, trust_pickle=True) == 2
    assert other.phase is Phase.MAIN
    with pytest.raises(TypeError, match="trust_pickle"):
        load_latest(tmp_path, model, opt, {"cur": other}, trust_pickle="yes")


def test_check_safe_to_load(tmp_path):
    _saved(tmp_path / "ckpt")
    assert check_safe_to_load(tmp_path / "ckpt") == 1
    marker = tmp_path / "marker"
    _tamper(tmp_path / "ckpt" / RANK_FILE, _CallsFunction(marker))
    with pytest.raises(UnsafeCheckpointError, match=r"_write_marker"):
        check_safe_to_load(tmp_path / "ckpt")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        check_safe_to_load(tmp_path / "nothing")
    # torch's legacy (non-zip) format cannot be memory-mapped: checked all the same
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"w": torch.ones(2)}, legacy / "a.pt", _use_new_zipfile_serialization=False)
    assert check_safe_to_load(legacy) == 1
    (legacy / "b.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"b\.pt cannot be read"):
        check_safe_to_load(legacy)
