"""Time the blocking local-SGD sync step of Lookahead(AdamW) (a torchrun worker, one per node).

The trainer's 4.82M-parameter model (6 layers, d=256), k=4, 8 syncs; rank 0 prints ``RESULT {json}``
with every sync step's ``opt.step()`` time and the median of the other steps. Compare two versions of
the library by putting one first on PYTHONPATH (``git archive <commit> src | tar -x -C /tmp/base``)::

    PYTHONPATH=/tmp/base/src python tools/netcluster.py --nodes 2 --rate 200mbit --log-dir /tmp/st \
        --torchrun benchmarks/sync_step_timing.py && grep RESULT /tmp/st/node0.log
"""

import json
import statistics
import time

import torch
import torch.distributed as dist

import lookahead_dist
from lookahead_dist import Lookahead
from lookahead_dist.demo.model import ModelConfig, TinyLM
from lookahead_dist.sync.local_sgd import LocalSGDOptions

torch.set_num_threads(1)
dist.init_process_group("gloo")
torch.manual_seed(0)
m = TinyLM(ModelConfig(n_layer=6, d_model=256, n_head=8))
k = 4
opt = Lookahead(torch.optim.AdamW(m.parameters(), lr=3e-3, foreach=True), k=k, alpha=0.5,
                local_sgd=LocalSGDOptions(module=m))
x = torch.randint(0, 256, (2, 64))
sync, other = [], []
for i in range(1, 8 * k + 1):
    loss = m(x).float().mean()
    opt.zero_grad()
    loss.backward()
    dist.barrier()
    t = time.perf_counter()
    opt.step()
    dt = time.perf_counter() - t
    (sync if i % k == 0 else other).append(dt)
if dist.get_rank() == 0:
    print("RESULT " + json.dumps({"lib": lookahead_dist.__file__, "sync_s": [round(s, 4) for s in sorted(sync)],
                                  "sync_median": statistics.median(sync), "other_median": statistics.median(other)}))
dist.destroy_process_group()
