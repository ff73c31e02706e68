"""One replica group of a fault-tolerant local-SGD run: Lookahead(AdamW) synced through torchft.

Started by ``launch/ft_local_sgd.sh`` (a lighthouse and N of these on one machine), or by hand::

    torchft_lighthouse --min_replicas 1 --join_timeout_ms 10000 --bind [::]:29510 &
    TORCHFT_LIGHTHOUSE=http://localhost:29510 python launch/ft_train.py --replica 0 --groups 2 &
    TORCHFT_LIGHTHOUSE=http://localhost:29510 python launch/ft_train.py --replica 1 --groups 2 &

Each group is a single process with no default ``torch.distributed`` process group: it starts its
own TCPStore (the manager's rendezvous) and a ``torchft.Manager``; the Lookahead's sync goes
through the manager (``LocalSGDOptions(manager=...)``, docs/fault-tolerance.md). Kill a group
(``kill -9``) and start it again with the same ``--replica``: the others go on without it, and it
heals from a live peer at its first sync.

Data: the batch of inner step j (1..k) after the s-th committed sync is a function of (seed, s, j)
only, and replica r of the G groups trains on rows [r*B/G, (r+1)*B/G) of it, so a discarded window
is redone on the same data and an undisturbed run is reproducible (the tests replay it).

Flags: --replica --groups --syncs (stop at this many committed syncs) --k --alpha --lr
--outer-momentum --nesterov --batch --seed --step-sleep (seconds of pretend compute per inner step)
--timeout (collective and RPC timeout, s) --init-sync --log FILE (JSON lines: ready, sync, end)
--out DIR (final model and optimizer state) --stop-file FILE (a number in it overrides --syncs)
--go-file FILE (wait for it before training: lets a test start every group first)
--crash-in-allreduce N (fault injection: die inside the sync after committed step N)
--summarize LOG... (print a run's timeline from its logs).
"""

from __future__ import annotations

import time

_T0 = time.time()  # before torch is imported: startup_s counts the imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_example import build_model, checksum, global_batch, shard  # noqa: E402  (same model and data)

from lookahead_dist import Lookahead  # noqa: E402
from lookahead_dist.sync.local_sgd import LocalSGDOptions  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replica", type=int, default=int(os.environ.get("REPLICA_GROUP_ID", 0)))
    p.add_argument("--groups", type=int, default=int(os.environ.get("NUM_REPLICA_GROUPS", 2)),
                   help="replica groups the data is split over")
    p.add_argument("--lighthouse", default=os.environ.get("TORCHFT_LIGHTHOUSE", "http://localhost:29510"))
    p.add_argument("--syncs", type=int, default=20, help="stop after this many committed syncs")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--outer-momentum", type=float, default=0.5)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--batch", type=int, default=16, help="rows per inner step, all groups together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0, help="pretend compute per inner step, seconds")
    p.add_argument("--timeout", type=float, default=10.0, help="collective and RPC timeout, seconds")
    p.add_argument("--init-sync", action="store_true",
                   help="torchft init_sync: groups heal from one at the first sync (needed when the "
                   "models are not seeded identically; here they are)")
    p.add_argument("--log", help="append JSON lines here (ready, sync, end)")
    p.add_argument("--out", help="save the final model and optimizer state to OUT/final_r<replica>.pt")
    p.add_argument("--stop-file", help="if this file holds a number, it replaces --syncs (read at each sync)")
    p.add_argument("--go-file", help="wait for this file to exist before training")
    p.add_argument("--summarize", nargs="+", metavar="LOG",
                   help="print the timeline of a run from its --log files and exit (no training)")
    p.add_argument("--crash-in-allreduce", type=int, default=0,
                   help="fault injection: SIGKILL this process when the sync after committed step N "
                   "reaches the all-reduce (the quorum has formed with it; 0: never)")
    return p.parse_args(argv)


class EventLog:
    def __init__(self, path: str | None, replica: int) -> None:
        self.path, self.replica = path, replica

    def __call__(self, event: str, **fields: object) -> None:
        row = {"t": time.time(), "event": event, "replica": self.replica, "pid": os.getpid(), **fields}
        line = json.dumps(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        else:
            print(line, flush=True)


def target_syncs(args: argparse.Namespace) -> int:
    if args.stop_file and os.path.exists(args.stop_file):
        try:
            return int(Path(args.stop_file).read_text().strip())
        except ValueError:
            pass  # written half-way; read again at the next sync
    return args.syncs


def summarize(paths: list[str]) -> None:
    """The timeline of a run from its event logs: startups, kills, the survivors' stall, heals, the end."""
    events = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if not events:
        print("no events")
        return
    events.sort(key=lambda e: e["t"])
    t0 = events[0]["t"]
    by_pid: dict[int, list[dict]] = {}
    for e in events:
        by_pid.setdefault(e["pid"], []).append(e)
    ended = {pid for pid, es in by_pid.items() if es[-1]["event"] == "end"}
    deaths = []
    for pid, es in by_pid.items():
        r = es[0]["replica"]
        ready = next((e for e in es if e["event"] == "ready"), None)
        if ready:
            print(f"{ready['t'] - t0:+8.2f} s  replica {r} pid {pid}: ready (startup {ready['startup_s']:.2f} s)")
        heal = next((e for e in es if e["event"] == "sync" and e["healed"]), None)
        if heal:
            print(f"{heal['t'] - t0:+8.2f} s  replica {r} pid {pid}: healed from a peer at step {heal['step']} "
                  f"(that sync took {heal['sync_s']:.2f} s, its quorum {heal['quorum_s']:.2f} s)")
        if pid not in ended:
            deaths.append(es[-1]["t"])
            print(f"{es[-1]['t'] - t0:+8.2f} s  replica {r} pid {pid}: last sign of life ({es[-1]['event']}, "
                  f"step {es[-1].get('step')}); no end: killed")
    for pid in sorted(ended):
        es = [e for e in by_pid[pid] if e["event"] == "sync"]
        r = by_pid[pid][0]["replica"]
        gaps = [(b["t"] - a["t"], a, b) for a, b in zip(es, es[1:])]
        if gaps:
            gap, a, b = max(gaps, key=lambda g: g[0])
            typical = sorted(g[0] for g in gaps)[len(gaps) // 2]
            alone = sum(1 for e in es if e["committed"] and e["participants"] == 1)
            dropped = sum(1 for e in es if not e["committed"])
            print(f"          replica {r} pid {pid}: longest gap between syncs {gap:.2f} s "
                  f"({a['t'] - t0:+.2f} -> {b['t'] - t0:+.2f} s; median {typical:.3f} s); {alone} syncs committed "
                  f"alone, {dropped} windows dropped")
        end = by_pid[pid][-1]
        print(f"{end['t'] - t0:+8.2f} s  replica {r} pid {pid}: end at step {end['step']}, committed "
              f"{end['committed']}, dropped {end['discarded']}, healed {end['healed']}, checksum {end['checksum']:.12e}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return
    t_start = _T0
    if args.batch % args.groups:
        raise SystemExit(f"ft_train.py: --batch {args.batch} must be divisible by --groups {args.groups}")
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo

    log = EventLog(args.log, args.replica)
    timeout = timedelta(seconds=args.timeout)
    # The replica group's own rendezvous store (torchrun would provide one); port 0: any free port.
    store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    model = build_model(args.seed)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=1,
        use_async_quorum=False,  # heal inside start_quorum, before this group's progress is packed
        timeout=timeout,
        quorum_timeout=timedelta(seconds=max(60.0, 6 * args.timeout)),
        connect_timeout=timeout,
        rank=0,
        world_size=1,
        store_addr="localhost",
        store_port=store.port,
        lighthouse_addr=args.lighthouse,
        replica_id=f"replica_{args.replica}",
        init_sync=args.init_sync,
    )
    # The user registers the model; the Lookahead registers its own state (slow weights, counters,
    # outer momentum, AdamW state) at its first step.
    manager.register_state_dict_fn("model", model.load_state_dict, model.state_dict)
    opt = Lookahead(
        torch.optim.AdamW(model.parameters(), lr=args.lr), k=args.k, alpha=args.alpha,
        local_sgd=LocalSGDOptions(manager=manager, outer_momentum=args.outer_momentum, nesterov=args.nesterov),
    )
    ft = opt.local_sgd.ft
    if args.crash_in_allreduce:
        send = manager.allreduce

        def allreduce_or_die(tensor, *a, **kw):
            if manager.current_step() == args.crash_in_allreduce:
                log("crash", step=manager.current_step())
                os.kill(os.getpid(), signal.SIGKILL)
            return send(tensor, *a, **kw)

        manager.allreduce = allreduce_or_die
    log("ready", startup_s=round(time.time() - t_start, 3), step=manager.current_step())
    if args.go_file:
        while not os.path.exists(args.go_file):
            time.sleep(0.05)

    j = 0  # inner step within the window
    target = target_syncs(args)
    while manager.current_step() < target:
        s = manager.current_step()
        j += 1
        x, y = (shard(t, args.replica, args.groups) for t in global_batch(args.seed, s * args.k + j, args.batch))
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        before = (ft.syncs, ft.committed, ft.healed)
        opt.step()
        if ft.syncs != before[0]:
            j = 0
            log("sync", step=manager.current_step(), committed=ft.committed != before[1],
                healed=ft.healed != before[2], participants=manager.num_participants(),
                quorum_s=round(ft.last_quorum_s, 4), sync_s=round(ft.last_sync_s, 4),
                loss=round(loss.item(), 6), checksum=checksum(model))
            target = target_syncs(args)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": manager.current_step()},
                   os.path.join(args.out, f"final_r{args.replica}.pt"))
    log("end", step=manager.current_step(), committed=ft.committed, discarded=ft.discarded, healed=ft.healed,
        checksum=checksum(model), wall_s=round(time.time() - t_start, 3))
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
