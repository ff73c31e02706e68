"""benchmarks/soak.py's pure parts: its flags and the figures it computes from an event log.

No process is started here (tests/distributed/test_ft.py kills and heals real replica groups)."""

from __future__ import annotations

import pytest

from benchmarks import soak

K, ROWS = 4, 16


def test_flags_and_defaults():
    a = soak.parse_args([])
    assert (a.duration, a.period, a.replicas, a.seed, a.json, a.write) == (300.0, [60.0], 3, 0, None, False)
    a = soak.parse_args(["--duration", "30", "--period", "60", "20", "--replicas", "4", "--seed", "7",
                         "--json", "x.json", "--write"])
    assert (a.duration, a.period, a.replicas, a.seed, a.json, a.write) == (30.0, [60.0, 20.0], 4, 7, "x.json", True)
    assert soak.parse_args(["--period", "0"]).period == [0.0]


@pytest.mark.parametrize("argv", [["--duration", "0"], ["--period", "-1"], ["--period", "0", "20"],
                                  ["--replicas", "1"], ["--k", "0"]])
def test_bad_flags_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        soak.parse_args(argv)
    assert e.value.code == 2


def test_kill_times():
    assert soak.kill_times(300, 60) == [60, 120, 180, 240]
    assert soak.kill_times(300, 0) == []
    assert len(soak.kill_times(300, 20)) == 14


def _sync(t, pid, replica, step, committed=True, healed=False, sync_s=0.1, quorum_s=0.05):
    return {"t": t, "event": "sync", "pid": pid, "replica": replica, "step": step, "committed": committed,
            "healed": healed, "sync_s": sync_s, "quorum_s": quorum_s, "participants": 2}


def _log():
    """Two groups (pids 10, 20), a sync every second (k=4 steps of 0.225 s + a 0.1 s sync) from t=1;
    group 1 (pid 20) is killed at t=5.5, restarted as pid 21 at t=5.6, ready at t=9.6, and heals at
    its first sync at t=12 (committed, healed); group 0 drops one window at t=6 (the kill) and
    commits alone until then."""
    ev = [{"t": 0.5, "event": "ready", "pid": 10, "replica": 0, "startup_s": 3.0},
          {"t": 0.5, "event": "ready", "pid": 20, "replica": 1, "startup_s": 3.0}]
    step = 0
    for t in range(1, 6):  # both commit steps 1..5
        step += 1
        ev += [_sync(t, 10, 0, step), _sync(t + 0.01, 20, 1, step)]
    ev.append(_sync(6, 10, 0, step, committed=False))  # the window the kill broke
    for t in range(7, 12):  # alone
        step += 1
        ev.append(_sync(t, 10, 0, step))
    ev.append({"t": 9.6, "event": "ready", "pid": 21, "replica": 1, "startup_s": 3.5})
    step += 1
    ev += [_sync(12, 10, 0, step), _sync(12.01, 21, 1, step, healed=True, sync_s=0.5, quorum_s=0.4)]
    step += 1
    ev += [_sync(13, 10, 0, step), _sync(13.01, 21, 1, step)]
    ev += [{"t": 13.5, "event": "end", "pid": 10, "replica": 0, "step": step, "checksum": 1.5},
           {"t": 13.5, "event": "end", "pid": 21, "replica": 1, "step": step, "checksum": 1.5}]
    return ev


def test_analyze_a_synthetic_log():
    kills = [{"t": 5.5, "replica": 1, "pid": 20}]
    spawns = [{"t": 0.0, "replica": 0, "pid": 10}, {"t": 0.0, "replica": 1, "pid": 20},
              {"t": 5.6, "replica": 1, "pid": 21}]
    r = soak.analyze(_log(), kills, spawns, t0=0.5, duration=12.0, k=K, rows=ROWS)
    # useful commits in [0.5, 12.5]: 5 + 5 (both, steps 1-5) + 5 (alone, steps 6-10) + 1 (step 11, group 0;
    # the healing group's window counts 0) = 16
    assert r["committed_samples"] == 16 * K * ROWS
    assert r["goodput"] == pytest.approx(16 * K * ROWS / 12.0)
    assert r["dropped_windows"] == 1 and r["failures"] == 1
    assert r["step_s"] == pytest.approx(0.225)
    (f,) = r["per_failure"]
    # killed 0.5 s after its last sync at 5.01: int(0.49 / 0.225) = 2 steps; + 1 dropped window + the heal window
    assert f["killed_steps"] == 2 and f["dropped_windows"] == 1 and f["steps_lost"] == 2 + K + K
    assert f["healed"] and f["heal_step"] == 11
    assert f["time_to_heal"] == pytest.approx(12.01 - 5.5)
    p = f["parts"]
    assert p["kill_to_spawn"] == pytest.approx(0.1) and p["spawn_to_ready"] == pytest.approx(4.0)
    assert p["imports_and_manager"] == 3.5 and p["first_window"] == pytest.approx(12.01 - 0.5 - 9.6)
    assert p["quorum_and_heal"] == 0.4 and p["rest_of_sync"] == pytest.approx(0.1)
    assert r["time_to_heal"]["median"] == pytest.approx(6.51) and r["not_healed"] == 0
    # group 0's gaps across the kill: 5->6, 6->7 ... 11->12 (1 s each); and 12->13 is after the heal
    assert f["survivors_longest_gap"] == pytest.approx(1.0) and r["sync_interval"]["median"] == pytest.approx(1.0)
    assert r["committed_lost"] == 0 and r["step_regressions"] == 0
    assert r["checksums_identical"] and r["final_steps"] == [12]


def test_analyze_flags_lost_commits_and_differing_replicas():
    ev = _log()
    ev[-1] = {**ev[-1], "step": 10, "checksum": 2.0}  # a group that ended behind, with other weights
    ev.append(_sync(12.5, 10, 0, 3))  # a commit far below what was committed before
    r = soak.analyze(ev, [], [], t0=0.5, duration=12.0, k=K, rows=ROWS)
    assert r["committed_lost"] == 2 and r["step_regressions"] == 1 and not r["checksums_identical"]
    assert r["per_failure"] == [] and r["time_to_heal"]["median"] is None


def test_table_compares_with_the_fault_free_runs_around_it(tmp_path, monkeypatch):
    def run(period, goodput, loss, **kw):
        return {"period_s": period, "goodput": goodput, "failures": 4 if period else 0,
                "steps_lost": soak._median_max([8, 12] if period else []),
                "time_to_heal": soak._median_max([9.0, 11.0] if period else []), "committed_lost": 0,
                "eval_loss": {0: loss, 1: loss}, "identical": True, "sync_interval": {"median": 1.0},
                "samples_per_sync": 100, **kw}
    runs = [run(0, 100.0, 0.2), run(60, 90.0, 0.22), run(0, 120.0, 0.25),
            run(60, 96.0, 0.25, heartbeat_ms=2000, join_timeout_ms=2000)]
    text = soak.table(runs)
    assert ("| kill every 60 s | 90.0 | 90.0 % / 75.0 % | 90.0 % | 4 | 10 / 12 | 10.0 s / 11.0 s | 0 | "
            "0.2200 (1.100x / 0.880x) | yes |") in text
    assert "| kill every 60 s (heartbeat 2 s, join 2 s) | 96.0 | 80.0 % / - | 96.0 % |" in text
    assert soak.own_rate_ratio({"goodput": 50.0}) is None

    doc = tmp_path / "reliability.md"
    doc.write_text("# Reliability\n\n## Sustained faults\n\nprose kept\n\n" + soak.BEGIN + "\nold\n" + soak.END +
                   "\n\nmore prose\n")
    monkeypatch.setattr(soak, "RELIABILITY", doc)
    soak.write_doc(soak.BEGIN + "\nnew\n" + soak.END)
    out = doc.read_text()
    assert "new" in out and "old" not in out and "prose kept" in out and "more prose" in out
