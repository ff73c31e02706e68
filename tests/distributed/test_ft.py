"""Fault-tolerant local SGD on torchft with real processes: a lighthouse, two replica groups, kill -9.

The lighthouse runs in the test process (torchft's ``LighthouseServer``, heartbeat timeout 2 s);
each replica group is one ``launch/ft_train.py`` process (Lookahead(AdamW), k=4, Nesterov outer
momentum, ``LocalSGDOptions(manager=...)``, no default process group). The run:

1. both groups start and train together for 3 committed syncs; those syncs must equal, to the
   last bit of a float64 checksum, an in-process replay of an undisturbed run (``_replay``);
2. group 1 is killed with SIGKILL, either from the test between two syncs or by itself inside a
   sync once the quorum has formed with it (``--crash-in-allreduce``: then group 0's all-reduce
   fails, its commit is refused and it drops the window, back on the last committed weights);
   group 0 stalls until the lighthouse stops hearing group 1, then commits syncs alone;
3. group 1 is started again with the same ``--replica``; at its first sync it heals from group 0
   and contributes nothing; from then on both log the same weights at every sync;
4. a stop file ends both at the same sync: their final weights and Lookahead state (slow
   weights, outer momentum, counters) must be equal bit for bit, and the final loss must lie
   within the seed-to-seed spread of undisturbed replays.

The timeline (stall, restart, heal) is printed; docs/fault-tolerance.md shows one such run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]
torchft = pytest.importorskip("torchft", reason="torchft is not installed (extra [ft]: pip install -e .[ft])")

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "launch" / "ft_train.py"
sys.path.insert(0, str(ROOT / "launch"))
from train_example import build_model, checksum, global_batch, shard  # noqa: E402

K, ALPHA, LR, BETA, BATCH, SEED, GROUPS = 4, 0.5, 1e-2, 0.5, 16, 0, 2
HEARTBEAT_MS = 2000
KILL_AT = 3      # kill group 1 once group 0 has committed this many syncs
ALONE = 3        # restart it once group 0 has committed this many syncs alone
TOGETHER = 2     # stop a few syncs after both have synced together this many times after the heal
NOISE_SEEDS = range(1, 7)


def _replay(seed: int, syncs: int) -> tuple[list[float], nn.Module]:
    """An undisturbed run of GROUPS replica groups in one process, with the worker's data and ops:
    k AdamW steps per group, mean progress, Nesterov outer step, every group restarts from phi."""
    models = [build_model(seed) for _ in range(GROUPS)]
    opts = [torch.optim.AdamW(m.parameters(), lr=LR) for m in models]
    phi = [p.detach().clone() for p in models[0].parameters()]
    mom = [torch.zeros_like(p) for p in phi]
    sums = []
    for s in range(syncs):
        for r, (m, o) in enumerate(zip(models, opts)):
            for j in range(1, K + 1):
                x, y = (shard(t, r, GROUPS) for t in global_batch(seed, s * K + j, BATCH))
                loss = nn.functional.mse_loss(m(x), y)
                o.zero_grad()
                loss.backward()
                o.step()
        with torch.no_grad():
            for i, ps in enumerate(zip(*(m.parameters() for m in models))):
                total = ps[0] - phi[i]
                for p in ps[1:]:
                    total = total + (p - phi[i])
                d = (total / GROUPS).neg_()  # the worker: sum over groups / participants / mean weight 1
                mom[i].mul_(BETA).add_(d)
                d.add_(mom[i], alpha=BETA)
                phi[i].add_(d, alpha=-ALPHA)
                for p in ps:
                    p.copy_(phi[i])
        sums.append(checksum(models[0]))
    return sums, models[0]


def _eval_loss(model: nn.Module) -> float:
    x, y = global_batch(SEED + 10_000, 0, 512)
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def _events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def _wait(pred, what: str, procs, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        for p in procs:
            if p.poll() not in (None, 0, -signal.SIGKILL):
                raise AssertionError(f"a replica group exited with {p.returncode} while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("where", ["between_syncs", "in_allreduce"])
def test_kill_one_replica_group_survivor_goes_on_restarted_group_heals(tmp_path, where):
    from torchft._torchft import LighthouseServer

    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=10_000, quorum_tick_ms=50,
                                  heartbeat_timeout_ms=HEARTBEAT_MS)
    go, stop, out = tmp_path / "go", tmp_path / "stop", tmp_path / "out"
    logs = [tmp_path / f"r{r}.jsonl" for r in range(GROUPS)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []

    def start(r: int, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, str(WORKER), "--replica", str(r), "--groups", str(GROUPS),
               "--lighthouse", lighthouse.address(), "--k", str(K), "--alpha", str(ALPHA), "--lr", str(LR),
               "--outer-momentum", str(BETA), "--nesterov", "--batch", str(BATCH), "--seed", str(SEED),
               "--step-sleep", "0.05", "--timeout", "5", "--syncs", "1000000", "--stop-file", str(stop),
               "--go-file", str(go), "--log", str(logs[r]), "--out", str(out), *extra]
        with open(tmp_path / f"r{r}.out", "a") as f:
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    def syncs(r: int, pid: int | None = None) -> list[dict]:
        return [e for e in _events(logs[r]) if e["event"] == "sync" and (pid is None or e["pid"] == pid)]

    try:
        a = start(0)
        b = start(1, *(["--crash-in-allreduce", str(KILL_AT)] if where == "in_allreduce" else []))
        _wait(lambda: all(any(e["event"] == "ready" for e in _events(lg)) for lg in logs), "both groups ready", procs)
        go.touch()
        if where == "between_syncs":
            _wait(lambda: [e for e in syncs(0) if e["committed"] and e["step"] >= KILL_AT], "syncs before the kill",
                  procs)
            os.kill(b.pid, signal.SIGKILL)
            t_kill = time.time()
        else:  # group 1 kills itself in the sync after step KILL_AT, once the quorum holds both
            crash = _wait(lambda: [e for e in _events(logs[1]) if e["event"] == "crash"], "the crash", procs)
            t_kill = crash[0]["t"]
        assert b.wait(timeout=30) == -signal.SIGKILL
        def syncs_alone() -> list[dict] | None:
            got = [e for e in syncs(0) if e["t"] > t_kill and e["committed"] and e["participants"] == 1]
            return got if len(got) >= ALONE else None

        alone = _wait(syncs_alone, "the survivor's syncs alone", procs)
        t_restart = time.time()
        b2 = start(1)
        healed = _wait(lambda: [e for e in syncs(1, b2.pid) if e["healed"]], "the restarted group to heal", procs)
        _wait(lambda: len([e for e in syncs(1, b2.pid) if e["committed"] and e["participants"] == 2
                           and not e["healed"]]) >= TOGETHER, "joint syncs after the heal", procs)
        target = max(e["step"] for e in syncs(0)) + 3
        stop.write_text(str(target))
        for p in (a, b2):
            assert p.wait(timeout=60) == 0, (tmp_path / "r0.out").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        lighthouse.shutdown()

    ev0, ev1 = syncs(0), syncs(1)
    ready1 = next(e for e in _events(logs[1]) if e["event"] == "ready" and e["pid"] == b2.pid)

    # 1. Before the kill the run is the undisturbed run, bit for bit.
    ref, _ = _replay(SEED, KILL_AT + 3)
    for r, ev in ((0, ev0), (1, [e for e in ev1 if e["pid"] == b.pid])):
        before = [e for e in ev if e["t"] < t_kill and e["committed"]]
        assert len(before) >= (KILL_AT if r == 0 else 1) and [e["step"] for e in before] == list(range(1, len(before) + 1))
        assert [e["checksum"] for e in before] == ref[:len(before)], r

    # 2. The survivor went on alone. A kill inside the all-reduce fails the survivor's commit: it
    #    drops the window and is back on the last committed weights.
    assert all(e["participants"] == 1 for e in alone)
    after = [e for e in ev0 if e["t"] > t_kill]
    if where == "in_allreduce":
        assert not after[0]["committed"] and after[0]["step"] == KILL_AT, after[0]
        assert after[0]["checksum"] == ref[KILL_AT - 1]
    last_before = max(e["t"] for e in ev0 if e["t"] < t_kill)
    first_after = min(e["t"] for e in ev0 if e["t"] > t_kill and e["committed"])
    discarded = len([e for e in ev0 if e["t"] > t_kill and not e["committed"]])

    # 3. The restarted group healed at its first sync, and from then on both hold the same weights.
    first = next(e for e in ev1 if e["pid"] == b2.pid)
    assert first["healed"] and first["committed"], first
    by_step0 = {e["step"]: e["checksum"] for e in ev0 if e["committed"]}
    joint = [e for e in ev1 if e["pid"] == b2.pid and e["committed"]]
    assert joint and all(by_step0[e["step"]] == e["checksum"] for e in joint)

    # 4. Same final state, bit for bit; loss within the undisturbed run's seed-to-seed spread.
    s0 = torch.load(out / "final_r0.pt", weights_only=False)
    s1 = torch.load(out / "final_r1.pt", weights_only=False)
    assert s0["step"] == s1["step"] == target
    for key in s0["model"]:
        assert torch.equal(s0["model"][key], s1["model"][key]), key
    # Lookahead's state (slow weights, outer momentum, counters) is shared; the AdamW moments are
    # each group's own (local SGD syncs weights, not inner state): the healed group started from
    # its peer's moments, then trained on its own rows.
    st0, st1 = s0["opt"]["state"], s1["opt"]["state"]
    assert st0.keys() == st1.keys()
    shared = 0
    for i in st0:
        assert st0[i].keys() == st1[i].keys()
        for key, v in st0[i].items():
            if key.startswith("lookahead_"):
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(st1[i][key])), (i, key)
                shared += 1
    assert shared >= 2 * len(st0)  # slow weight and outer momentum of every parameter
    model = build_model(SEED)
    model.load_state_dict(s0["model"])
    loss_ft = _eval_loss(model)
    ref_losses = torch.tensor([_eval_loss(_replay(seed, target)[1]) for seed in [SEED, *NOISE_SEEDS]])
    mean, std = ref_losses.mean().item(), ref_losses.std().item()
    print(f"\nFT-TIMELINE ({where}) kill at {t_kill:.3f}; survivor's last sync before it {last_before - t_kill:+.2f} s, "
          f"first commit after it {first_after - t_kill:+.2f} s (stall {first_after - last_before:.2f} s, "
          f"{discarded} window(s) discarded); "
          f"restart launched {t_restart - t_kill:+.2f} s, ready {ready1['t'] - t_kill:+.2f} s "
          f"(startup {ready1['startup_s']:.2f} s); healed at {healed[0]['t'] - t_kill:+.2f} s "
          f"(sync {healed[0]['sync_s']:.2f} s, quorum {healed[0]['quorum_s']:.2f} s); survivor syncs alone: "
          f"{len([e for e in ev0 if t_kill < e['t'] < healed[0]['t']])}; final step {target}\n"
          f"FT-LOSS faulted {loss_ft:.5f}; undisturbed seeds {[round(v, 5) for v in ref_losses.tolist()]} "
          f"mean {mean:.5f} std {std:.5f}")
    assert abs(loss_ft - mean) <= 3 * std, (loss_ft, ref_losses)
