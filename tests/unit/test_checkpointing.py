"""lookahead_dist.checkpointing in one process: round trip, pruning, extras, RNG, and kill -9
at each point of a save (the process really dies; a forked child takes the signal)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

import lookahead_dist.checkpointing as ckpt
from lookahead_dist import SLOW_KEY, Lookahead
from lookahead_dist.checkpointing import LATEST, latest_step, load_latest, save_checkpoint


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2), k=3, alpha=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, steps: range) -> None:
    for t in steps:
        g = torch.Generator().manual_seed(t)  # the batch of step t: a function of t only
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_fresh_directory_resumes_from_zero(tmp_path):
    model, opt, sched = _setup()
    assert latest_step(tmp_path / "none") is None
    assert load_latest(tmp_path / "none", model, opt, {"sched": sched}) == 0
    assert not (tmp_path / "none").exists()


def test_resume_mid_cycle_equals_uninterrupted(tmp_path):
    """Save at step 7 (mid-cycle for k=3), resume in fresh objects: weights, slow weights, the
    scheduler and the RNG stream all continue as if never stopped."""
    ref = _setup()
    _train(*ref, range(1, 13))

    model, opt, sched = _setup()
    _train(model, opt, sched, range(1, 8))
    save_checkpoint(tmp_path, model, opt, 7, {"sched": sched})
    after_save = torch.rand(3)

    model2, opt2, sched2 = _setup(seed=1)  # other initial weights: all must come from the file
    torch.manual_seed(123)
    assert load_latest(tmp_path, model2, opt2, {"sched": sched2}) == 7
    assert torch.equal(torch.rand(3), after_save)
    assert sched2.last_epoch == 7
    _train(model2, opt2, sched2, range(8, 13))
    assert _same(model2, ref[0])
    for p, q in zip(model2.parameters(), ref[0].parameters()):
        assert torch.equal(opt2.slow_weight(p), ref[1].slow_weight(q))


def test_layout_latest_and_pruning(tmp_path):
    model, opt, sched = _setup()
    for step in (5, 10, 15):
        _train(model, opt, sched, range(step - 4, step + 1))
        d = save_checkpoint(tmp_path, model, opt, step, keep=2)
        assert d == tmp_path / f"step_{step:08d}" and (d / "rank_0.pt").is_file()
    assert (tmp_path / LATEST).read_text() == "step_00000015"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_00000010", "step_00000015"]
    assert not list(tmp_path.rglob("*.tmp"))
    record = torch.load(tmp_path / "step_00000015" / "rank_0.pt", weights_only=False)
    assert record["format"] == ckpt.FORMAT and record["world_size"] == 1 and record["step"] == 15
    assert any(SLOW_KEY in s for s in record["optimizer"]["state"].values())


def test_ddp_wrapper_is_unwrapped(tmp_path, one_rank_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, opt, _ = _setup()
    save_checkpoint(tmp_path, DDP(model), opt, 1)
    record = torch.load(tmp_path / "step_00000001" / "rank_0.pt", weights_only=False)
    assert list(record["model"]) == list(model.state_dict())  # no "module." prefix
    model2, opt2, _ = _setup(seed=3)
    assert load_latest(tmp_path, DDP(model2), opt2) == 1 and _same(model2, model)


def _die_in(point: str, root: Path, monkeypatch) -> None:
    """In a forked child: save step 5 fully, then SIGKILL itself in the middle of saving step 10."""
    model, opt, sched = _setup()
    _train(model, opt, sched, range(1, 6))
    save_checkpoint(root, model, opt, 5)
    torch.save(model.state_dict(), root / "expected.pt")
    _train(model, opt, sched, range(6, 11))
    real_save, real_text = ckpt._atomic_save, ckpt._atomic_write_text

    def half_written(obj, path):  # write half of the rank file's .tmp, then die
        real_save(obj, path)
        data = path.read_bytes()
        path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
        path.unlink()
        os.kill(os.getpid(), signal.SIGKILL)

    def die_before_latest(text, path):  # every rank file is complete; `latest` not yet moved
        path.with_name(path.name + ".tmp").write_text(text[:3])
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "rank_file":
        monkeypatch.setattr(ckpt, "_atomic_save", half_written)
    else:
        monkeypatch.setattr(ckpt, "_atomic_write_text", die_before_latest)
    save_checkpoint(root, model, opt, 10)
    del real_text


@pytest.mark.parametrize("point", ["rank_file", "latest"])
def test_kill9_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, point):
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            _die_in(point, tmp_path, monkeypatch)
        finally:
            os._exit(3)  # reached only if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert (tmp_path / "step_00000010").is_dir()  # the interrupted save had started
    assert latest_step(tmp_path) == 5
    model, opt, sched = _setup(seed=2)
    assert load_latest(tmp_path, model, opt) == 5
    expected = torch.load(tmp_path / "expected.pt")
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    # The next save of step 10 overwrites the debris and commits.
    save_checkpoint(tmp_path, model, opt, 10)
    assert latest_step(tmp_path) == 10 and not list(tmp_path.rglob("*.tmp"))


def test_shared_store_warning(tmp_path, monkeypatch):
    """Note [torchrun's shared store]: restarts allowed + the agent's store shared -> a warning."""
    model, opt, _ = _setup()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.warns(UserWarning, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        load_latest(tmp_path, model, opt)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_latest(tmp_path, model, opt)
