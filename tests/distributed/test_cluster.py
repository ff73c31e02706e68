"""The simulated cluster (tools/netcluster.py): a real 2-node torchrun job across shaped namespaces,
teardown on success, failure, Ctrl-C and SIGKILL, and the clean refusal without privileges.

Skipped unless this host can build namespaces (root with CAP_NET_ADMIN/CAP_SYS_ADMIN, ip, tc).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools import netcluster as cl  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(cl.unavailable_reason() is not None,
                       reason=f"cannot build network namespaces here: {cl.unavailable_reason()}"),
]
TOOL = [sys.executable, str(ROOT / "tools" / "netcluster.py")]


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _ours(pid: int) -> list[str]:
    return [ns for ns in cl.list_namespaces() if ns.startswith(f"{cl.NAME_ROOT}-{pid}-")]


def _prefix(pid: int) -> str:
    """``lkdc-<pid>-<start>`` of the tool with this pid (from any of its namespaces)."""
    ours = _ours(pid)
    return ours[0].rsplit("-", 1)[0] if ours else "none"


def _ns_pids(ns: str) -> list[str]:
    return subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()


def _wait_for(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(120)
def test_two_node_torchrun_allreduce_over_shaped_link_then_teardown(tmp_path):
    links_before = _host_links()
    rate = 50_000_000  # 50 Mbit/s: 2 MiB take ~0.34 s, so tbf's 96 KiB burst is a 5 % effect
    payload_mb = 2
    with cl.Cluster(2, rate, master_port=29511) as c:
        names = c.namespaces()
        assert set(names) <= set(cl.list_namespaces())
        # The host namespace gains nothing: every link lives inside the cluster's namespaces.
        assert _host_links() == links_before
        cmd = cl.torchrun_prefix(1) + [str(ROOT / "benchmarks" / "cluster_bandwidth.py"), "--worker",
                                       "--payload-mb", str(payload_mb), "--iters", "2"]
        results = c.run(cmd, timeout=90, log_dir=tmp_path)
    assert [r.returncode for r in results] == [0, 0], results[0].output()[-2000:] + results[1].output()[-2000:]
    line = next(ln for ln in results[0].output().splitlines() if ln.startswith("LKD_BW_RESULT "))
    res = json.loads(line.split(" ", 1)[1])
    # The all-reduced value is right (checked in the worker against world*(world+1)/2 elementwise).
    assert res["world"] == 2 and res["correct"] is True
    # The payload really crossed node 0's eth0 (not loopback): a 2-rank ring sends P bytes per call.
    payload = payload_mb * 2**20
    assert 0.95 * payload <= res["wire_tx_bytes_per_call"] <= 1.5 * payload
    # Shaping is in force: the link cannot carry more than its rate (plus the token bucket's burst).
    assert res["busbw_bps"] <= 1.15 * rate
    # Teardown leaves no namespace and no link behind.
    assert not set(names) & set(cl.list_namespaces())
    assert _host_links() == links_before


@pytest.mark.timeout(60)
def test_cli_failure_interrupt_and_crash_all_clean_up(tmp_path):
    before = cl.list_namespaces()
    # A failing node: the tool kills the other after the grace period and returns the failure's code.
    script = 'if [ "$NODE_RANK" = 1 ]; then exit 3; fi; sleep 60'
    t0 = time.monotonic()
    proc = subprocess.run(TOOL + ["--nodes", "2", "--rate", "100mbit", "--grace", "1", "--quiet",
                                  "--log-dir", str(tmp_path / "fail"), "--", "sh", "-c", script],
                          capture_output=True, text=True, timeout=40)
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - t0 < 30 and "node 0: killed" in proc.stderr
    assert cl.list_namespaces() == before

    # Ctrl-C (SIGINT to the tool): rc 130, namespaces and the nodes' processes gone.
    p = subprocess.Popen(TOOL + ["--nodes", "2", "--quiet", "--", "sleep", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: len(_ours(p.pid)) == 3), "cluster never came up"
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == cl.EXIT_INTERRUPTED, err
    assert "Traceback" not in err and _ours(p.pid) == []

    # SIGKILL (no chance to clean up): the leftovers are stale and the next start removes them.
    p = subprocess.Popen(TOOL + ["--nodes", "2", "--quiet", "--", "sleep", "60"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: len(_ours(p.pid)) == 3 and _ns_pids(_prefix(p.pid) + "-n1")), \
            "cluster never came up"
        p.kill()
        p.wait(timeout=10)
        stale = _ours(p.pid)
        assert len(stale) == 3
        sleepers = _ns_pids(_prefix(p.pid) + "-n1")
        assert sleepers, "the node's process should outlive the killed tool"
        out = subprocess.run(TOOL + ["--cleanup"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and _ours(p.pid) == [], out.stdout + out.stderr
        assert not any(Path(f"/proc/{pid}").exists() for pid in sleepers)
    finally:
        p.kill()
        cl.cleanup_stale()

def test_without_privileges_or_tools_refuses_cleanly():
    # Missing ip/tc: a PATH without them.
    no_tools = str(ROOT / "launch")  # a directory without ip or tc in it
    assert shutil.which("ip", path=no_tools) is None
    env = dict(os.environ, PATH=no_tools)
    proc = subprocess.run(TOOL + ["--nodes", "2", "--", "true"], capture_output=True, text=True, env=env,
                          timeout=30)
    assert proc.returncode == cl.EXIT_UNAVAILABLE
    assert "ip and tc not found" in proc.stderr and "Traceback" not in proc.stderr

    # Root without the capabilities (what an unprivileged user has): setpriv drops them all.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not available to drop capabilities")
    before = cl.list_namespaces()
    proc = subprocess.run([setpriv, "--inh-caps=-all", "--bounding-set=-all", "--"] + TOOL
                          + ["--nodes", "2", "--", "true"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == cl.EXIT_UNAVAILABLE, proc.stderr
    assert "needs root" in proc.stderr and "CAP_NET_ADMIN" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert cl.list_namespaces() == before


def test_rate_parsing_and_argument_errors():
    assert cl.parse_rate("100mbit") == 100_000_000
    assert cl.parse_rate("1gbit") == cl.parse_rate("1G") == 10**9
    assert cl.parse_rate("10gbit") == 10**10
    assert cl.parse_rate("0") is None and cl.parse_rate(None) is None
    with pytest.raises(ValueError, match="fast"):
        cl.parse_rate("fast")
    with pytest.raises(ValueError, match="nodes"):
        cl.Cluster(0)
    with pytest.raises(ValueError, match="subnet"):
        cl.Cluster(2, subnet="192.168.1")
    # torchrun: a .py script runs with this Python; a console script gets --no-python.
    assert cl.torchrun_argv(["train.py", "--x"])[-2:] == ["train.py", "--x"]
    assert "--no-python" not in cl.torchrun_argv(["train.py"])
    assert cl.torchrun_argv(["lookahead-dist", "train"])[-3:] == ["--no-python", "lookahead-dist", "train"]


def test_plan_probe_measures_the_shaped_link_and_a_straggler():
    """`lookahead-dist plan --probe` from node 0 to `probe-server` on nodes 1 and 2: node 1's link is
    200 Mbit/s, node 2's (node_rates) 50 Mbit/s; each measurement lands within 15% of its shaping."""
    exe = str(Path(sys.executable).parent / "lookahead-dist")
    with cl.Cluster(3, "200mbit", node_rates={2: "50mbit"}, master_port=29760) as c:
        servers = [subprocess.Popen(["ip", "netns", "exec", c.node_ns(i), exe, "probe-server", "--port", "29651"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                   for i in (1, 2)]
        try:
            measured = {}
            for node, nominal in ((1, 200e6), (2, 50e6)):
                cmd = ["ip", "netns", "exec", c.node_ns(0), exe, "plan", "--params", "1M", "--step-time", "10ms",
                       "--nodes", "2", "--probe", f"{c.addr(node)}:29651", "--probe-bytes", "4M", "--json"]
                for _ in range(50):  # the server needs a moment to listen
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
                    if "Connection refused" not in proc.stderr:
                        break
                    time.sleep(0.1)
                assert proc.returncode == 0, proc.stderr
                line = next(x for x in proc.stderr.splitlines() if x.startswith("# link to"))
                mbit = float(line.split(": ")[1].split(" Mbit/s")[0])
                measured[node] = mbit
                assert abs(mbit * 1e6 / nominal - 1) < 0.15, (node, line)
            assert json.loads(proc.stdout)[0]["mode"] == "ddp"
        finally:
            for s in servers:
                os.killpg(s.pid, signal.SIGTERM)
                s.wait(timeout=10)
