"""The ``"lookahead"`` block of a DeepSpeed config: one parser, read by :func:`~lookahead_dist.deepspeed.initialize`,
:mod:`lookahead_dist.accelerate` and :mod:`lookahead_dist.hf`, and the config a client Lookahead needs.

Imports no DeepSpeed.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch

from ..lookahead import check_alpha, check_k
from ..sync.options import COMM_DTYPES

#: Top-level DeepSpeed config key of the Lookahead block read by :func:`initialize`.
LOOKAHEAD_CONFIG_KEY = "lookahead"
_BLOCK_KEYS = ("k", "alpha", "pullback", "slow_dtype", "local_sgd")


def lookahead_config(config: dict[str, Any], *, offload_client_optimizer: bool = True) -> dict[str, Any]:
    """A copy of a DeepSpeed config with what a client Lookahead needs set (unless set already).

    - ``zero_allow_untested_optimizer: true``: ZeRO otherwise rejects any optimizer type outside
      its list (a ``Lookahead`` is not on it, whatever it wraps).
    - with ``offload_optimizer`` and ``offload_client_optimizer``: ``zero_force_ds_cpu_optimizer:
      false``, so that DeepSpeed keeps the client Lookahead (around ``DeepSpeedCPUAdam`` or a
      torch optimizer) instead of refusing it.
    """
    if not isinstance(config, dict):
        raise TypeError(f"DeepSpeed config must be a dict here, got {type(config).__name__}")
    out = dict(config)
    zero = out.get("zero_optimization") or {}
    if zero.get("stage", 0):
        out.setdefault("zero_allow_untested_optimizer", True)
    offload = zero.get("offload_optimizer") or {}
    if offload_client_optimizer and offload.get("device", "none") not in ("none", None):
        out.setdefault("zero_force_ds_cpu_optimizer", False)
    return out


def parse_lookahead_block(block: Any) -> dict[str, Any]:
    """The checked ``"lookahead"`` block of a DeepSpeed config (also read by :mod:`lookahead_dist.accelerate`).

    Imports no DeepSpeed; raises TypeError/ValueError naming the bad key or value.
    """
    if not isinstance(block, dict):
        raise TypeError(f'DeepSpeed config "{LOOKAHEAD_CONFIG_KEY}" must be a JSON object, got {block!r}')
    unknown = sorted(set(block) - set(_BLOCK_KEYS), key=str)
    if unknown:
        raise ValueError(
            f'unknown key(s) {unknown} in DeepSpeed config "{LOOKAHEAD_CONFIG_KEY}"; allowed: {list(_BLOCK_KEYS)}'
            + _did_you_mean(unknown, _BLOCK_KEYS)
        )
    out: dict[str, Any] = {
        "k": check_k(block.get("k", 5), f"{LOOKAHEAD_CONFIG_KEY}.k"),
        "alpha": check_alpha(block.get("alpha", 0.5), f"{LOOKAHEAD_CONFIG_KEY}.alpha"),
        "pullback": block.get("pullback", "none"),
    }
    from ..lookahead import PULLBACK_MODES

    if out["pullback"] not in PULLBACK_MODES:
        raise ValueError(f'"{LOOKAHEAD_CONFIG_KEY}.pullback" must be one of {PULLBACK_MODES}, got {out["pullback"]!r}')
    slow_dtype = block.get("slow_dtype")
    dtypes = {None: None, "fp32": torch.float32, "float32": torch.float32}
    if slow_dtype not in dtypes:
        raise ValueError(f'"{LOOKAHEAD_CONFIG_KEY}.slow_dtype" must be "fp32" or null, got {slow_dtype!r}')
    out["slow_dtype"] = dtypes[slow_dtype]
    out["local_sgd"] = _parse_local_sgd(block.get("local_sgd", False))
    if isinstance(out["local_sgd"], dict):  # the fragment schedule needs k: checked now, not at the first step
        from ..sync import streaming

        options = out["local_sgd"]["options"]
        try:
            streaming.check_schedule(out["k"], options.num_fragments, options.fragment_sync_delay,
                                     f'the "{LOOKAHEAD_CONFIG_KEY}" block')
        except ValueError as e:
            raise ValueError(f'"{LOOKAHEAD_CONFIG_KEY}.local_sgd" does not fit "{LOOKAHEAD_CONFIG_KEY}.k" = {out["k"]}: {e}') from e
    return out


def _normalized(key: str) -> str:
    return "".join(c for c in key.lower() if c not in " _-\t")


def _did_you_mean(unknown: list[Any], allowed: tuple[str, ...]) -> str:
    """`` (did you mean "k"?)`` for the unknown keys close to an allowed one (case, ``_``/``-`` ignored), or ""."""
    by_norm = {_normalized(a): a for a in allowed}
    hints = []
    for key in unknown:
        if not isinstance(key, str):
            continue
        close = difflib.get_close_matches(_normalized(key), list(by_norm), n=1, cutoff=0.75)
        if close:
            hints.append(f"{key!r} -> {by_norm[close[0]]!r}")
    return f" (did you mean: {', '.join(hints)}?)" if hints else ""


def _check_block_name(config: dict[str, Any]) -> None:
    """Raise if a top-level key of a DeepSpeed config looks like a misspelled ``"lookahead"``.

    DeepSpeed ignores top-level keys it does not know, so ``"lookahaed"``, ``"LookAhead"``,
    ``"look_ahead"`` or ``"lookahead "`` would train the plain optimizer without a word. Compared
    case-insensitively, with spaces, ``_`` and ``-`` ignored, by :mod:`difflib` similarity (0.8).
    Called by :func:`initialize`, :func:`lookahead_dist.accelerate.prepare` and
    :class:`lookahead_dist.hf.LookaheadTrainer`, with or without a ``"lookahead"`` block.
    """
    if not isinstance(config, dict):
        return
    want = _normalized(LOOKAHEAD_CONFIG_KEY)
    for key in config:
        if key == LOOKAHEAD_CONFIG_KEY or not isinstance(key, str):
            continue
        if difflib.SequenceMatcher(None, _normalized(key), want).ratio() >= 0.8:
            raise ValueError(
                f'DeepSpeed config key {key!r} looks like a misspelled "{LOOKAHEAD_CONFIG_KEY}": DeepSpeed ignores '
                f'keys it does not know, so this run would train without Lookahead. Rename it to "{LOOKAHEAD_CONFIG_KEY}" '
                "(lower case, no spaces) or remove it"
            )


# -- local SGD across nodes (Note [Local SGD across nodes] in nodes.py) ------------------------------------
_LOCAL_SGD_KEYS = ("across", "ranks_per_node", "outer_momentum", "nesterov", "comm_dtype", "num_fragments",
                   "fragment_sync_delay", "fragment_update_alpha", "bucket_cap_mb", "timeout", "eager_update",
                   "topk_fraction", "fused_kernels")
_COMM_DTYPES = {None: None, **COMM_DTYPES}  # the one table of wire names (sync/options.py)


def _parse_local_sgd(value: Any) -> dict[str, Any] | bool | None:
    """The ``"local_sgd"`` entry of the block: None (off), True (local SGD over all ranks: ZeRO stage 0
    only, :func:`_check_local_sgd_stage`), or ``{"ranks_per_node", "options"}`` (across nodes)."""
    where = f'"{LOOKAHEAD_CONFIG_KEY}.local_sgd"'
    if value is False or value is None:
        return None
    if value is True:
        return True
    if not isinstance(value, dict):
        raise TypeError(f'{where} must be true, false or an object such as {{"across": "nodes"}}, got {value!r}')
    unknown = sorted(set(value) - set(_LOCAL_SGD_KEYS), key=str)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {list(_LOCAL_SGD_KEYS)}"
                         + _did_you_mean(unknown, _LOCAL_SGD_KEYS))
    if value.get("across") != "nodes":
        raise ValueError(f'{where}.across must be "nodes" (the only supported layout), got {value.get("across")!r}')
    rpn = value.get("ranks_per_node")
    if rpn is not None and (isinstance(rpn, bool) or not isinstance(rpn, int) or rpn < 1):
        raise ValueError(f"{where}.ranks_per_node must be an int >= 1 or null (LOCAL_WORLD_SIZE), got {rpn!r}")
    cd = value.get("comm_dtype")
    if cd not in _COMM_DTYPES:
        raise ValueError(f"{where}.comm_dtype must be one of {list(_COMM_DTYPES)}, got {cd!r}")
    from ..sync.local_sgd import LocalSGDOptions

    kwargs = {key: value[key] for key in _LOCAL_SGD_KEYS[2:] if key in value and key != "comm_dtype"}
    try:  # LocalSGDOptions checks every field (no process group needed yet)
        options = LocalSGDOptions(comm_dtype=_COMM_DTYPES[cd], init="none", **kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from e
    return {"ranks_per_node": rpn, "options": options}


def _check_local_sgd_stage(stage: Any) -> None:
    """Local SGD over all ranks (``"local_sgd": true``, or a ``Lookahead(..., local_sgd=True)``) under
    DeepSpeed: ZeRO stage 0 only. One rule and one message for :func:`initialize` and
    :func:`lookahead_dist.accelerate.prepare`."""
    if stage != 0:
        raise ValueError(
            f"Lookahead local-SGD mode (\"local_sgd\": true) under DeepSpeed needs ZeRO stage 0, got stage {stage}: "
            "stages 1-3 partition the optimizer step across ranks, so no rank can keep its own fast weights. Set "
            '"zero_optimization": {"stage": 0}, or write "local_sgd": {"across": "nodes"} for ZeRO inside each node '
            'and local SGD across nodes (docs/deepspeed.md), or local_sgd false'
        )


def _load_config(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if isinstance(config, dict):
        return config
    if isinstance(config, str):
        import json

        with open(config) as f:
            return json.load(f)
    return None  # a DeepSpeedConfig object or anything else: left to DeepSpeed
