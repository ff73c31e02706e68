"""Measure a link between two hosts: round-trip latency and upload bandwidth over one TCP stream.

``lookahead-dist probe-server`` runs on the far host; ``lookahead-dist plan --probe HOST[:PORT]``
(or :func:`probe`) connects to it. The protocol is three messages, so that nothing else is needed
on either host (no iperf3, no torch.distributed rendezvous):

- ``b"P"``: the server answers ``b"p"`` at once. The median of ``pings`` round trips, halved, is the
  latency per message of the alpha-beta model (Note [Alpha-beta collectives] in ``plan``).
- ``b"S"`` + 8-byte big-endian length, then that many bytes: the server reads them all and answers
  ``b"K"``. Bandwidth = bytes / (time from the first byte sent to the answer, minus one round
  trip); the median of ``rounds`` transfers is reported. One TCP stream, like gloo's and NCCL's
  socket transport per channel; a link that needs several streams to fill reads low here.
- ``b"Q"``: the client is done.

Only the client's upload direction is measured: shaped links (tc) and most WAN links are
symmetric; run it from the other end too where they are not.
"""

from __future__ import annotations

import socket
import socketserver
import statistics
import struct
import threading
import time
from dataclasses import dataclass

__all__ = ["DEFAULT_PORT", "LinkMeasurement", "probe", "serve", "start_server"]

DEFAULT_PORT = 29650
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LinkMeasurement:
    """``bandwidth`` bytes/s (upload, one stream) and ``latency`` seconds per message (RTT / 2)."""

    host: str
    port: int
    bandwidth: float
    latency: float
    rtt_samples: tuple[float, ...]
    bandwidth_samples: tuple[float, ...]
    nbytes: int

    def describe(self) -> str:
        spread = (f"{min(self.bandwidth_samples) * 8 / 1e6:.1f}-{max(self.bandwidth_samples) * 8 / 1e6:.1f}"
                  if len(self.bandwidth_samples) > 1 else "")
        return (f"link to {self.host}:{self.port}: {self.bandwidth * 8 / 1e6:.1f} Mbit/s upload"
                f"{f' (runs {spread})' if spread else ''}, latency {self.latency * 1e3:.3f} ms "
                f"(half the median of {len(self.rtt_samples)} round trips), {self.nbytes / 2**20:.0f} MiB per run")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(min(n - len(buf), _CHUNK))
        if not part:
            raise ConnectionError(f"link probe: the peer closed the connection after {len(buf)} of {n} bytes")
        buf += part
    return bytes(buf)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                cmd = sock.recv(1)
            except ConnectionError:
                return
            if cmd in (b"", b"Q"):
                return
            if cmd == b"P":
                sock.sendall(b"p")
            elif cmd == b"S":
                (n,) = struct.unpack(">Q", _recv_exact(sock, 8))
                left = n
                while left:
                    got = sock.recv(min(left, _CHUNK))
                    if not got:
                        return
                    left -= len(got)
                sock.sendall(b"K")
            else:
                return  # not our protocol: drop the connection


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def start_server(host: str = "0.0.0.0", port: int = DEFAULT_PORT) -> tuple[socketserver.BaseServer, int]:
    """A probe server in a background thread; returns it (``.shutdown()`` stops it) and its port."""
    server = _Server((host, port), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def serve(host: str = "0.0.0.0", port: int = DEFAULT_PORT) -> None:
    """Answer probes until interrupted (``lookahead-dist probe-server``)."""
    with _Server((host, port), _Handler) as server:
        server.serve_forever()


def probe(host: str, port: int = DEFAULT_PORT, *, nbytes: int = 16 << 20, rounds: int = 3, pings: int = 20,
          timeout: float = 120.0) -> LinkMeasurement:
    """Measure the link to a probe server at ``host:port``."""
    if nbytes < 1 or rounds < 1 or pings < 1:
        raise ValueError(f"probe: nbytes, rounds and pings must be >= 1, got {nbytes}, {rounds}, {pings}")
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ConnectionError(f"link probe: cannot connect to {host}:{port} ({exc}); is "
                              f"`lookahead-dist probe-server --port {port}` running there?") from None
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            sock.sendall(b"P")
            if _recv_exact(sock, 1) != b"p":
                raise ConnectionError(f"link probe: {host}:{port} is not a lookahead-dist probe server")
            rtts.append(time.perf_counter() - t0)
        rtt = statistics.median(rtts)
        payload = bytes(_CHUNK)
        rates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            sock.sendall(b"S" + struct.pack(">Q", nbytes))
            left = nbytes
            while left:
                n = min(left, _CHUNK)
                sock.sendall(payload[:n])
                left -= n
            if _recv_exact(sock, 1) != b"K":
                raise ConnectionError(f"link probe: {host}:{port} answered the transfer with something else")
            rates.append(nbytes / max(time.perf_counter() - t0 - rtt, 1e-9))
        sock.sendall(b"Q")
    return LinkMeasurement(host, port, statistics.median(rates), rtt / 2, tuple(rtts), tuple(rates), nbytes)
