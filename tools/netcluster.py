"""A small multi-node cluster on one machine: network namespaces behind a shaped virtual switch.

A tool for measuring communication (benchmarks/scaling.py, benchmarks/cluster_bandwidth.py,
tests/distributed/test_cluster.py); import it as ``tools.netcluster`` from the repository root.

Topology (a star, all of it outside the host's own network namespace)::

    node i  (netns <prefix>-n<i>)             switch (netns <prefix>-sw)
      lo  up                                    br0 (Linux bridge)
      eth0 10.77.0.<i+1>/24  <== veth ==>       p<i>  (port of br0)

Each node's link is full duplex at ``rate`` bit/s: a token bucket (``tbf``) shapes eth0's egress
(the node's uplink) and p<i>'s egress (its downlink), so N senders cannot push more than ``rate``
into one receiver. ``delay_ms`` adds one-way latency on each uplink with ``netem`` (so node to node
one way is ``delay_ms``, round trip ``2 * delay_ms``); a kernel without ``sch_netem`` is reported as
such instead of silently running unshaped. Only the addresses created here (``10.77.0.0/24`` by
default) exist in those namespaces and no link touches the host namespace, so the traffic cannot
leave them.

Every namespace name carries the owner's pid and process start time (``lkdc-<pid>-<start>-...``),
so a later run can tell the leftovers of a crashed (SIGKILLed) run from a live concurrent cluster
and removes only the former. Teardown kills each node's processes (their process group, then any
other process still inside the namespace) and deletes the namespaces, which destroys the veths;
it runs from ``finally``, and SIGINT/SIGTERM/SIGHUP are turned into exceptions so it runs on those too.

Command line (root, or CAP_NET_ADMIN + CAP_SYS_ADMIN, and ``ip``/``tc`` from iproute2)::

    python tools/netcluster.py --nodes 2 --rate 1gbit -- \\
        torchrun --nnodes {nnodes} --nproc-per-node 1 --node-rank {node_rank} \\
                 --master-addr {master_addr} --master-port {master_port} train.py
    python tools/netcluster.py --nodes 2 --rate 100mbit --torchrun train.py --steps 10
    python tools/netcluster.py --nodes 4 --rate 1gbit --torchrun lookahead-dist train --mode ddp
    python tools/netcluster.py --cleanup          # remove leftovers of crashed runs

``{node_rank} {nnodes} {master_addr} {master_port} {ifname} {addr}`` in the command are replaced
per node; node<i> resolves to node i's address inside the nodes; the same values are exported as NODE_RANK, NNODES, MASTER_ADDR, MASTER_PORT,
GLOO_SOCKET_IFNAME (and TP_SOCKET_IFNAME, NCCL_SOCKET_IFNAME) and LKD_NODE_ADDR.
Exit status: 0 when every node exited 0; the first failing node's status otherwise; 124 on timeout;
130 on interrupt; 77 when the host cannot build a cluster (no privileges, no ``ip``/``tc``, a
missing kernel feature), with a one-line reason and no traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

NAME_ROOT = "lkdc"
IFNAME = "eth0"
MAX_NODES = 16
EXIT_UNAVAILABLE = 77
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
# Bits 12 and 21 of the capability sets: netlink changes need NET_ADMIN; `ip netns add/exec`
# mount namespaces and need SYS_ADMIN.
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:bit|bps|b)?(?:/s)?\s*$", re.I)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class ClusterUnavailable(RuntimeError):
    """This host cannot build a cluster (privileges, tools, kernel features); the message says why."""


class ClusterError(RuntimeError):
    """A setup or teardown command failed; the message names the command and its error output."""


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM/SIGHUP arrived; raised so that ``finally`` blocks tear the cluster down."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def parse_rate(text: str | int | float | None) -> int | None:
    """Bits per second from ``"100mbit"``, ``"1gbit"``, ``"10G"``, ``"500M"`` or a number of bit/s.

    ``None``, ``0``, ``"0"``, ``"none"`` and ``"off"`` mean an unshaped link (``None``).
    """
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"rate must be >= 0 bit/s, got {text!r}")
        return int(text) or None
    if not isinstance(text, str):
        raise TypeError(f"rate must be a string like '1gbit' or a number of bit/s, got {text!r}")
    if text.strip().lower() in ("0", "none", "off", "unshaped"):
        return None
    m = _RATE_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse rate {text!r}; use e.g. '100mbit', '1gbit', '10gbit'")
    bits = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if bits < 8_000:
        raise ValueError(f"rate {text!r} is below 8 kbit/s; tbf cannot shape that usefully")
    return bits


def format_rate(bits: int | None) -> str:
    if bits is None:
        return "unshaped"
    for unit, scale in (("Gbit/s", 10**9), ("Mbit/s", 10**6), ("kbit/s", 10**3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits} bit/s"


# ----------------------------------------------------------------------------- host checks


def _cap_eff() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def unavailable_reason() -> str | None:
    """Why this host cannot build a cluster, or None when it can (privileges and tools only)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux; this is {sys.platform}"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return (f"{' and '.join(missing)} not found on PATH; install iproute2 "
                f"(e.g. apt-get install iproute2)")
    caps = _cap_eff()
    lacking = [name for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))
               if not caps >> bit & 1]
    if lacking:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        return (f"building network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); "
                f"running as {who} without {' and '.join(lacking)}; rerun with sudo")
    return None


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{shlex.join(argv)}` failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after it are plain.
    return stat.rsplit(")", 1)[1].split()[19]


_NS_RE = re.compile(rf"^{NAME_ROOT}-(\d+)-(\d+)-(sw|n\d+)$")


def list_namespaces() -> list[str]:
    """Names of every namespace this tool created that still exists (any owner)."""
    if shutil.which("ip") is None:
        return []
    out = _run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if _NS_RE.match(n)]


def _kill_namespace_pids(ns: str) -> None:
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(int(pid), sig)
                alive.append(pid)
            except (ProcessLookupError, ValueError):
                pass
        if not alive:
            return
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in alive):
            time.sleep(0.05)
        pids = [p for p in alive if Path(f"/proc/{p}").exists()]


ETC_NETNS = Path("/etc/netns")


def _delete_namespace(ns: str) -> None:
    _kill_namespace_pids(ns)
    _run(["ip", "netns", "delete", ns], check=False)
    shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)


def cleanup_stale(all_owners: bool = False) -> list[str]:
    """Delete namespaces left by runs whose owner process is gone (or every one, ``all_owners``).

    A namespace is stale when no process with its recorded pid *and* start time exists, so a
    cluster that a concurrent, live run owns is left alone.
    """
    removed = []
    # /etc/netns/<ns> (the nodes' hosts files) may outlive its namespace after a crash.
    etc = [p.name for p in ETC_NETNS.iterdir() if _NS_RE.match(p.name)] if ETC_NETNS.is_dir() else []
    for ns in sorted(set(list_namespaces()) | set(etc)):
        pid, start = _NS_RE.match(ns).group(1, 2)
        if all_owners or _start_time(int(pid)) != start:
            _delete_namespace(ns)
            removed.append(ns)
    return removed


# ----------------------------------------------------------------------------- the cluster


@dataclass
class NodeResult:
    node_rank: int
    returncode: int | None
    log_path: Path
    seconds: float

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class _Proc:
    rank: int
    popen: subprocess.Popen
    log_path: Path
    started: float
    ended: float | None = None
    threads: list[threading.Thread] = field(default_factory=list)


_PLACEHOLDER_RE = re.compile(r"\{(node_rank|nnodes|master_addr|master_port|ifname|addr)\}")


class Cluster:
    """``nodes`` network namespaces joined through a shaped bridge; a context manager.

    >>> with Cluster(2, rate="1gbit") as c:               # doctest: +SKIP
    ...     results = c.run("torchrun ... --node-rank {node_rank} ... train.py", timeout=120)

    ``rate``: per-node link rate in each direction (``parse_rate``); ``None`` leaves it unshaped.
    ``node_rates``: node -> rate for the nodes whose link differs (a straggler link), e.g. ``{1: "50mbit"}``.
    ``delay_ms``: added one-way latency on each node's uplink (needs ``sch_netem``).
    """

    def __init__(self, nodes: int, rate: str | int | None = "1gbit", *, delay_ms: float = 0.0,
                 subnet: str = "10.77.0", master_port: int = 29500,
                 node_rates: dict[int, str | int] | None = None) -> None:
        if not isinstance(nodes, int) or isinstance(nodes, bool) or not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be an int in [1, {MAX_NODES}], got {nodes!r}")
        if not isinstance(delay_ms, (int, float)) or delay_ms < 0:
            raise ValueError(f"delay_ms must be a number >= 0, got {delay_ms!r}")
        if not re.fullmatch(r"10\.\d{1,3}\.\d{1,3}", subnet):
            raise ValueError(f"subnet must be a private /24 prefix like '10.77.0', got {subnet!r}")
        if not 1024 <= master_port <= 65535:
            raise ValueError(f"master_port must be in [1024, 65535], got {master_port!r}")
        self.nodes = nodes
        self.rate_bps = parse_rate(rate)
        self.node_rates_bps: dict[int, int | None] = {}
        for node, r in (node_rates or {}).items():
            if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < nodes:
                raise ValueError(f"node_rates: node must be an int in [0, {nodes - 1}], got {node!r}")
            self.node_rates_bps[node] = parse_rate(r)
        self.delay_ms = float(delay_ms)
        self.subnet = subnet
        self.master_port = master_port
        self.ifname = IFNAME
        pid = os.getpid()
        self.prefix = f"{NAME_ROOT}-{pid}-{_start_time(pid)}"
        self._created: list[str] = []
        self._procs: list[_Proc] = []
        self._up = False

    # -- names and addresses
    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}-sw"

    def node_ns(self, rank: int) -> str:
        return f"{self.prefix}-n{rank}"

    def addr(self, rank: int) -> str:
        return f"{self.subnet}.{rank + 1}"

    @property
    def master_addr(self) -> str:
        return self.addr(0)

    def namespaces(self) -> list[str]:
        return [self.switch_ns] + [self.node_ns(i) for i in range(self.nodes)]

    def describe(self) -> str:
        delay = f", +{self.delay_ms:g} ms one-way" if self.delay_ms else ""
        slow = "".join(f", node {i}: {format_rate(b)}" for i, b in sorted(self.node_rates_bps.items()))
        return (f"{self.nodes} node(s) {self.addr(0)}..{self.addr(self.nodes - 1)} on {self.ifname}, "
                f"link {format_rate(self.rate_bps)} each direction{delay}{slow}")

    # -- lifecycle
    def __enter__(self) -> "Cluster":
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Build the namespaces, links, addresses and shaping; on any failure, undo what was built."""
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        cleanup_stale()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._up = True

    def _ns_add(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._created.append(ns)

    def _hosts_file(self, ns: str) -> None:
        """/etc/netns/<ns>/hosts, which `ip netns exec` mounts over /etc/hosts: node<i> names resolve
        (both ways, so c10d's reverse lookups of peers succeed instead of warning)."""
        d = ETC_NETNS / ns
        d.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost", "::ffff:127.0.0.1 localhost",
                 f"127.0.1.1 {socket.gethostname()}"]
        lines += [f"{self.addr(i)} node{i}" for i in range(self.nodes)]
        # Dual-stack listeners (c10d's store) see IPv4 peers as ::ffff:a.b.c.d.
        lines += [f"::ffff:{self.addr(i)} node{i}" for i in range(self.nodes)]
        (d / "hosts").write_text("\n".join(lines) + "\n")

    def _build(self) -> None:
        sw = self.switch_ns
        self._ns_add(sw)
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        for i in range(self.nodes):
            ns, port = self.node_ns(i), f"p{i}"
            self._ns_add(ns)
            self._hosts_file(ns)
            # Both ends are created directly inside their namespaces: nothing ever appears in
            # the host namespace, not even for a moment.
            _run(["ip", "link", "add", self.ifname, "netns", ns, "type", "veth",
                  "peer", "name", port, "netns", sw])
            _run(["ip", "-n", sw, "link", "set", port, "master", "br0"])
            _run(["ip", "-n", sw, "link", "set", port, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", self.ifname])
            _run(["ip", "-n", ns, "link", "set", self.ifname, "up"])
            rate = self.node_rates_bps.get(i, self.rate_bps)
            self._shape(ns, self.ifname, uplink=True, rate=rate)
            self._shape(sw, port, uplink=False, rate=rate)

    def _shape(self, ns: str, dev: str, *, uplink: bool, rate: int | None) -> None:
        delay = self.delay_ms if uplink else 0.0
        if rate is None and not delay:
            return
        if delay:
            # netem does both the delay and the rate; its queue must hold a bandwidth-delay
            # product of packets or TCP sees drops instead of latency.
            args = ["netem", "delay", f"{delay:g}ms"]
            if rate is not None:
                args += ["rate", f"{rate}bit"]
            bdp_packets = int((rate or 10**10) / 8 * (2 * delay / 1000) / 1500) + 1000
            args += ["limit", str(bdp_packets)]
        else:
            # Burst: at least one 64 KiB GSO super-packet from veth plus 1 ms at line rate, so
            # tbf does not split every packet; queue: 20 ms at line rate (TCP needs some buffer).
            bytes_per_s = rate / 8
            burst = int(max(96 * 1024, bytes_per_s * 0.001))
            limit = int(max(2 * burst, bytes_per_s * 0.020))
            args = ["tbf", "rate", f"{rate}bit", "burst", str(burst), "limit", str(limit)]
        proc = _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *args], check=False)
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip()
            if "unknown" in err.lower():
                kind = args[0]
                raise ClusterUnavailable(
                    f"this kernel has no '{kind}' qdisc (CONFIG_NET_SCH_{kind.upper()}); "
                    + ("added latency (--delay-ms) needs sch_netem; run with --delay-ms 0"
                       if kind == "netem" else "bandwidth shaping needs sch_tbf"))
            raise ClusterError(f"`tc -n {ns} qdisc replace dev {dev} root {' '.join(args)}` failed: {err}")

    def down(self) -> None:
        """Kill every process on the nodes and delete the namespaces; safe to call twice."""
        # A second Ctrl-C (or a TERM/HUP) must not cut teardown short: ignore them meanwhile.
        old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                old[s] = signal.signal(s, signal.SIG_IGN)
        try:
            self._stop_all()
            for ns in reversed(self._created):
                _delete_namespace(ns)
            self._created.clear()
            self._up = False
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # -- running commands
    def node_env(self, rank: int, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(
            NODE_RANK=str(rank), NNODES=str(self.nodes), MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port), GLOO_SOCKET_IFNAME=self.ifname,
            TP_SOCKET_IFNAME=self.ifname, NCCL_SOCKET_IFNAME=self.ifname, LKD_NODE_ADDR=self.addr(rank),
            LKD_CLUSTER_RATE_BPS=str(self.rate_bps or 0),
        )
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def expand(self, command: str | Sequence[str], rank: int) -> list[str]:
        """The argv for node ``rank``: placeholders replaced, a string split like a shell would."""
        values = {"node_rank": str(rank), "nnodes": str(self.nodes), "master_addr": self.master_addr,
                  "master_port": str(self.master_port), "ifname": self.ifname, "addr": self.addr(rank)}
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise ValueError("command is empty")
        return [_PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], a) for a in argv]

    def start(self, command: str | Sequence[str], *, log_dir: str | Path | None = None,
              echo: bool = False, env: dict[str, str] | None = None) -> None:
        """Start ``command`` on every node (its own session, output to ``log_dir/node<i>.log``)."""
        if not self._up:
            raise RuntimeError("cluster is not up; use it as a context manager or call up()")
        if self._procs:
            raise RuntimeError("a command is already running on this cluster")
        log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="lkd-cluster-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        for rank in range(self.nodes):
            argv = ["ip", "netns", "exec", self.node_ns(rank), *self.expand(command, rank)]
            log_path = log_dir / f"node{rank}.log"
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=self.node_env(rank, env),
                                     start_new_session=True)
            proc = _Proc(rank, popen, log_path, time.monotonic())
            t = threading.Thread(target=_pump, args=(popen.stdout, log_path, f"[node{rank}] " if echo else None),
                                 daemon=True)
            t.start()
            proc.threads.append(t)
            self._procs.append(proc)

    def wait(self, timeout: float | None = None, grace: float = 15.0) -> list[NodeResult]:
        """Wait for every node; when one fails, give the others ``grace`` seconds, then kill them.

        A node killed here (timeout, or after another's failure) reports returncode None.
        Raises TimeoutError after ``timeout`` seconds (nodes killed first).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        kill_at: float | None = None
        while True:
            now = time.monotonic()
            pending = []
            for p in self._procs:
                if p.ended is None and p.popen.poll() is not None:
                    p.ended = now
                if p.ended is None:
                    pending.append(p)
                elif p.popen.returncode != 0 and kill_at is None:
                    kill_at = now + grace
            if not pending:
                break
            if deadline is not None and now > deadline:
                self._stop_all()
                raise TimeoutError(f"nodes {[p.rank for p in pending]} still running after {timeout:g} s; killed")
            if kill_at is not None and now > kill_at:
                self._stop_all(keep_results=True)
                break
            time.sleep(0.05)
        results = self._results()
        self._stop_all()
        return results

    def run(self, command: str | Sequence[str], *, timeout: float | None = None, grace: float = 15.0,
            log_dir: str | Path | None = None, echo: bool = False,
            env: dict[str, str] | None = None) -> list[NodeResult]:
        """``start`` then ``wait``: one result per node, in node order."""
        self.start(command, log_dir=log_dir, echo=echo, env=env)
        return self.wait(timeout=timeout, grace=grace)

    def _results(self) -> list[NodeResult]:
        out = []
        for p in self._procs:
            for t in p.threads:
                t.join(timeout=5)
            rc = p.popen.returncode if p.ended is not None else None
            out.append(NodeResult(p.rank, rc, p.log_path, (p.ended or time.monotonic()) - p.started))
        return out

    def _stop_all(self, keep_results: bool = False) -> None:
        for p in self._procs:
            if p.popen.poll() is None:
                _kill_group(p.popen)
        for p in self._procs:
            for t in p.threads:
                t.join(timeout=5)
        if not keep_results:
            self._procs = []


def _kill_group(popen: subprocess.Popen) -> None:
    """SIGTERM the process group (torchrun forwards it to its workers), SIGKILL after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            pass
        try:
            popen.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _pump(stream, log_path: Path, echo_prefix: str | None) -> None:
    with open(log_path, "w") as log:
        for line in iter(stream.readline, b""):
            text = line.decode(errors="replace")
            log.write(text)
            log.flush()
            if echo_prefix is not None:
                sys.stdout.write(echo_prefix + text)
                sys.stdout.flush()
    stream.close()


@dataclass
class _Signals:
    """Turn SIGINT/SIGTERM/SIGHUP into ``Interrupted`` while active (main thread only)."""

    old: dict[int, object] = field(default_factory=dict)

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self.old[s] = signal.signal(s, _raise_interrupted)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def signals_raise() -> _Signals:
    return _Signals()


# ----------------------------------------------------------------------------- command line


def torchrun_prefix(nproc_per_node: int = 1) -> list[str]:
    """``python -m torch.distributed.run`` (the interpreter running this tool) for a multi-node job."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "{nnodes}",
            "--nproc-per-node", str(nproc_per_node), "--node-rank", "{node_rank}",
            "--master-addr", "{master_addr}", "--master-port", "{master_port}"]


def torchrun_argv(command: Sequence[str], nproc_per_node: int = 1) -> list[str]:
    """``command`` under multi-node torchrun; a program that is not a ``.py`` file (a console
    script such as ``lookahead-dist``) gets ``--no-python``; a leading option (``-m mod``,
    ``--no-python``) is passed to torchrun as given."""
    command = list(command)
    if not command:
        raise ValueError("command is empty")
    first = command[0]
    extra = [] if first.endswith(".py") or first.startswith("-") else ["--no-python"]
    return torchrun_prefix(nproc_per_node) + extra + command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="netcluster.py", description="Run a command on N network-namespace 'nodes' behind a shaped link.",
        epilog="Placeholders in COMMAND: {node_rank} {nnodes} {master_addr} {master_port} {ifname} {addr}.")
    parser.add_argument("--nodes", type=int, default=2, help="number of nodes (1-%d)" % MAX_NODES)
    parser.add_argument("--rate", default="1gbit", help="link rate per node and direction: 100mbit, 1gbit, "
                        "10gbit, or 0 for unshaped (default 1gbit)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added one-way latency (needs sch_netem)")
    parser.add_argument("--subnet", default="10.77.0", help="/24 prefix of node addresses (default 10.77.0)")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--timeout", type=float, default=None, help="kill everything after this many seconds")
    parser.add_argument("--grace", type=float, default=15.0, help="seconds the other nodes get after one fails")
    parser.add_argument("--log-dir", default=None, help="per-node logs node<i>.log (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true", help="do not echo node output")
    parser.add_argument("--torchrun", action="store_true",
                        help="run COMMAND (a .py script, a console script, or -- -m module) under "
                        "multi-node torchrun on every node")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="with --torchrun")
    parser.add_argument("--cleanup", action="store_true",
                        help="delete the namespaces of crashed runs and exit (with --all: of every run)")
    parser.add_argument("--all", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run on every node (after --)")
    args = parser.parse_args(argv)

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    reason = unavailable_reason()
    if reason:
        print(f"netcluster.py: cannot build a cluster on this host: {reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.cleanup:
        removed = cleanup_stale(all_owners=args.all)
        print(f"netcluster.py: removed {len(removed)} namespace(s)" + (": " + " ".join(removed) if removed else ""))
        return 0
    if not command:
        parser.error("no command given (put it after --)")
    if args.torchrun:
        command = torchrun_argv(command, args.nproc_per_node)
    try:
        cluster = Cluster(args.nodes, args.rate, delay_ms=args.delay_ms, subnet=args.subnet,
                          master_port=args.master_port)
    except (ValueError, TypeError) as e:
        parser.error(str(e))

    with signals_raise():
        try:
            try:
                cluster.up()
                print(f"netcluster.py: up: {cluster.describe()}", file=sys.stderr, flush=True)
                results = cluster.run(command, timeout=args.timeout, grace=args.grace,
                                      log_dir=args.log_dir, echo=not args.quiet)
            finally:
                cluster.down()
        except ClusterUnavailable as e:
            print(f"netcluster.py: cannot build a cluster on this host: {e}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        except ClusterError as e:
            print(f"netcluster.py: {e}", file=sys.stderr)
            return 1
        except TimeoutError as e:
            print(f"netcluster.py: timeout: {e}", file=sys.stderr)
            return EXIT_TIMEOUT
        except Interrupted as e:
            print(f"netcluster.py: interrupted by {e}; cluster torn down", file=sys.stderr)
            return EXIT_INTERRUPTED
    for r in results:
        status = "killed" if r.returncode is None else f"exit {r.returncode}"
        print(f"netcluster.py: node {r.node_rank}: {status} after {r.seconds:.1f} s (log {r.log_path})",
              file=sys.stderr)
    failed = [r for r in results if r.returncode != 0]
    if not failed:
        return 0
    first = min(failed, key=lambda r: (r.returncode is None, r.seconds))
    return first.returncode if first.returncode not in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
