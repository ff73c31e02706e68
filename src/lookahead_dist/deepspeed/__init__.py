"""DeepSpeed adapter: a ``"lookahead"`` config block, slow weights in the module, universal checkpoints.

Two ways in, both under ZeRO-1/2/3 (fp32 or bf16, optimizer offload included):

- a :class:`~lookahead_dist.Lookahead` passed as the client optimizer to ``deepspeed.initialize``
  (config: :func:`lookahead_config`);
- :func:`initialize`, a drop-in for ``deepspeed.initialize`` that reads a ``"lookahead"`` block and
  puts the Lookahead around the optimizer DeepSpeed itself builds (:func:`wrap_engine`).

With ``"local_sgd": {"across": "nodes", ...}`` in the block, ZeRO runs inside each node and the
nodes' replicas are averaged every k steps (Note [Local SGD across nodes] in :mod:`.nodes`: :func:`node_groups`,
:class:`NodeMPU`). Then :func:`use_slow_weights` / :func:`sync_now` act on the module's weights, and
:func:`convert_to_universal` / :func:`load_checkpoint` resume at another world size with the slow
weights. DeepSpeed is imported lazily (``import lookahead_dist.deepspeed`` does not import it).

How it fits (Note [Where slow weights live] in :mod:`lookahead_dist.lookahead`): DeepSpeed hands
the optimizer it steps its own fp32 master tensors -- one flat partition per param group (ZeRO-1/2,
and the bf16 ZeRO-1 optimizer), or one flat partition per sub-group, set into ``params`` only
around each ``step()`` call (ZeRO-3). The slow weight of such a tensor is an fp32 tensor of the
same shape in the inner optimizer's state, so each rank keeps ``total / N`` slow weights (plus
DeepSpeed's alignment padding) beside Adam's moments, syncs them in place with no communication,
and DeepSpeed's ``save_checkpoint``/``load_checkpoint`` carry them with the optimizer state.

What DeepSpeed needs in its config for a *client* Lookahead: ``"zero_allow_untested_optimizer":
true`` (ZeRO accepts only a fixed list of optimizer types otherwise) and, with
``offload_optimizer``, ``"zero_force_ds_cpu_optimizer": false`` (else DeepSpeed refuses any
client optimizer that is not DeepSpeedCPUAdam; ``Lookahead(DeepSpeedCPUAdam(...))`` is fine).
:func:`lookahead_config` sets both. :func:`initialize` needs neither: DeepSpeed sees its own optimizer.

One module per concern: :mod:`.config` (the block), :mod:`.introspect` (what an engine steps),
:mod:`.engine` (:func:`initialize`, :func:`wrap_engine`), :mod:`.op_build` (the op-build notice),
:mod:`.nodes` (node groups, :class:`NodeMPU`), :mod:`.node_checkpoints`, :mod:`.slow_weights`,
:mod:`.universal`, and ``python -m lookahead_dist.deepspeed`` (:mod:`.__main__`).
"""

from __future__ import annotations

from ..lookahead import find_lookahead
from .config import (
    LOOKAHEAD_CONFIG_KEY,
    _check_block_name,
    _check_local_sgd_stage,
    lookahead_config,
    parse_lookahead_block,
)
from .engine import _config_wins_on_load, initialize, skip_cpu_shm_kernel, wrap_engine
from .introspect import master_partitions, require_lookahead
from .node_checkpoints import _node_dir
from .nodes import (
    NodeGroups,
    NodeMPU,
    _align_across_world,
    align_across_world,
    inter_node_backend,
    node_groups,
)
from .op_build import _OP_BUILDERS, _op_for_optimizer, _op_is_built
from .slow_weights import (
    DeepSpeedStateBytes,
    full_slow_weight,
    state_bytes,
    sync_now,
    use_slow_weights,
)
from .universal import UNIVERSAL_GROUPS_KEY, convert_to_universal, load_checkpoint

__all__ = [
    "find_lookahead",
    "parse_lookahead_block",
    "master_partitions",
    "DeepSpeedStateBytes",
    "state_bytes",
    "full_slow_weight",
    "lookahead_config",
    "LOOKAHEAD_CONFIG_KEY",
    "initialize",
    "wrap_engine",
    "use_slow_weights",
    "sync_now",
    "convert_to_universal",
    "load_checkpoint",
    "UNIVERSAL_GROUPS_KEY",
    "skip_cpu_shm_kernel",
    "NodeGroups",
    "NodeMPU",
    "node_groups",
    "inter_node_backend",
    "align_across_world",
    "require_lookahead",
]
