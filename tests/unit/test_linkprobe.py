"""The link probe (lookahead_dist.linkprobe) and `lookahead-dist plan --probe`, on loopback. The
shaped-link accuracy is tested on the simulated cluster (tests/distributed/test_cluster.py)."""

from __future__ import annotations

import socket
import threading

import pytest

from lookahead_dist import cli
from lookahead_dist.linkprobe import probe, start_server


@pytest.fixture
def server():
    srv, port = start_server("127.0.0.1", 0)
    yield port
    srv.shutdown()
    srv.server_close()


def test_probe_measures_loopback(server):
    m = probe("127.0.0.1", server, nbytes=1 << 20, rounds=2, pings=5)
    assert m.bandwidth > 1e6 and 0 <= m.latency < 0.1
    assert len(m.rtt_samples) == 5 and len(m.bandwidth_samples) == 2
    assert "Mbit/s upload" in m.describe()


def test_probe_refuses_a_server_that_is_not_ours():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer_wrong() -> None:
        conn, _ = listener.accept()
        conn.recv(1)
        conn.sendall(b"x")
        conn.close()

    threading.Thread(target=answer_wrong, daemon=True).start()
    with pytest.raises(ConnectionError, match="not a lookahead-dist probe server"):
        probe("127.0.0.1", listener.getsockname()[1], pings=1)
    listener.close()


def test_probe_names_the_missing_server():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ConnectionError, match=f"probe-server --port {port}"):
        probe("127.0.0.1", port, pings=1)


def test_probe_rejects_bad_sizes():
    with pytest.raises(ValueError, match="nbytes, rounds and pings"):
        probe("127.0.0.1", 1, nbytes=0)


def test_plan_probe_sets_the_link(server, capsys):
    assert cli.main(["plan", "--params", "1M", "--step-time", "10ms", "--nodes", "2",
                     "--probe", f"127.0.0.1:{server}", "--probe-bytes", "1M"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# link to 127.0.0.1:{server}:") and ("Gbit/s link" in out or "Mbit/s link" in out)


@pytest.mark.parametrize("value, message", [("127.0.0.1:x", "must be an integer in 1..65535"),
                                            ("127.0.0.1:70000", "must be an integer in 1..65535")])
def test_plan_probe_bad_port(value, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "--params", "1M", "--step-time", "10ms", "--nodes", "2", "--probe", value])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_plan_measures_the_step_time_with_a_command(capsys):
    # 50 ms per step plus a start-up of 1 s that the two-count difference cancels (GNU sleep sums
    # its arguments; no interpreter start-up, whose time varies on a loaded machine). Total / steps
    # would give 133 ms.
    cmd = "sleep 1 $(( {steps} * 5 ))e-2"
    assert cli.main(["plan", "--params", "1M", "--step-time-cmd", cmd, "--step-time-steps", "2,12", "--nodes", "2",
                     "--link", "1Gbit"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    ms = float(line.split("step time ")[1].split(" ms")[0])
    assert 45 < ms < 80, line


@pytest.mark.parametrize("cmd, counts, message", [
    ("true", "5,25", "must contain {steps}"),
    ("true {steps}", "25,5", "1 <= A < B"),
    ("exit 3 # {steps}", "5,25", "exited 3 with 5 steps"),
])
def test_plan_step_time_cmd_errors(cmd, counts, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "--params", "1M", "--step-time-cmd", cmd, "--step-time-steps", counts, "--nodes", "2",
                  "--link", "1Gbit"])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def _fake_runs(monkeypatch, wall_times):
    """The step-time command's runs take the given wall times: a fake clock, so the noise rule is
    tested exactly (a real `true {steps}` differs between its two runs by random jitter)."""
    import subprocess
    import time

    clock = [0.0]
    durations = iter(wall_times)

    def run(cmd, **kwargs):
        clock[0] += next(durations)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])


@pytest.mark.parametrize("wall_times", [
    (0.003, 0.002),   # shorter: a command that ignores {steps}
    (0.003, 0.015),   # 12 ms longer: start-up jitter, under the 20 ms floor
    (10.0, 10.4),     # 0.4 s longer after a 10 s start-up: under 5% of it
])
def test_plan_step_time_cmd_within_noise_is_refused(wall_times, monkeypatch, capsys):
    _fake_runs(monkeypatch, wall_times)
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "--params", "1M", "--step-time-cmd", "train {steps}", "--nodes", "2", "--link", "1Gbit"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "took no longer than 5 beyond timing noise" in err, err
    assert "--step-time-steps further apart" in err


@pytest.mark.parametrize("wall_times, ms", [((10.0, 11.0), 50.0), ((0.003, 0.103), 5.0)])
def test_plan_step_time_cmd_clear_of_noise(wall_times, ms, monkeypatch, capsys):
    _fake_runs(monkeypatch, wall_times)
    assert cli.main(["plan", "--params", "1M", "--step-time-cmd", "train {steps}", "--nodes", "2",
                     "--link", "1Gbit"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert f"step time {ms:.1f} ms" in line or f"step time {ms:g} ms" in line, line
