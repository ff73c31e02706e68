"""One line before DeepSpeed JIT-compiles the optimizer op its ``"optimizer"`` block needs (minutes, first run only)."""

from __future__ import annotations

import os
from typing import Any

# DeepSpeed's JIT-compiled optimizer ops: op name -> builder class, as the accelerator names them.
_OP_BUILDERS = {"fused_adam": "FusedAdamBuilder", "cpu_adam": "CPUAdamBuilder", "cpu_adagrad": "CPUAdagradBuilder",
                "cpu_lion": "CPULionBuilder", "fused_lion": "FusedLionBuilder", "fused_lamb": "FusedLambBuilder"}
_ops_noticed: set[str] = set()


def _op_for_optimizer(config: dict[str, Any]) -> str | None:
    """The compiled op the config's ``"optimizer"`` block makes DeepSpeed load (its engine's choice), or None."""
    block = config.get("optimizer")
    if not isinstance(block, dict):
        return None
    name = str(block.get("type", "")).lower()
    params = block.get("params") or {}
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    cpu = str(offload.get("device", "none") or "none").lower() in ("cpu", "nvme")
    if name in ("adam", "adamw"):
        return None if params.get("torch_adam") else ("cpu_adam" if cpu else "fused_adam")
    if name == "adagrad":
        return "cpu_adagrad" if cpu else None
    if name == "lion":
        return "cpu_lion" if cpu else "fused_lion"
    if name == "lamb":
        return "fused_lamb"
    return None


def _op_is_built(name: str) -> bool | None:
    """True: the op loads without compiling (prebuilt, or in the JIT cache); False: it would compile;
    None: no build of it for this accelerator (DeepSpeed reports that itself)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(name):
        return True
    builder = get_accelerator().create_op_builder(_OP_BUILDERS[name])
    if builder is None or not builder.is_compatible(verbose=False):
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = _get_build_directory(getattr(builder, "name", name), verbose=False)
    except Exception:  # noqa: BLE001 - a torch-internal helper: without it, assume nothing is built
        return False
    return os.path.exists(os.path.join(folder, f"{getattr(builder, 'name', name)}.so"))


def _notice_op_build(config: dict[str, Any]) -> str | None:
    """One line on stderr (first local rank, once per op and process) before DeepSpeed compiles an op.

    Returns the notice (also where it is not printed), or None when nothing will compile.
    """
    name = _op_for_optimizer(config)
    if name is None or name in _ops_noticed:
        return None
    try:
        built = _op_is_built(name)
    except Exception:  # noqa: BLE001 - a notice must never stop the run
        return None
    if built is not False:
        return None
    _ops_noticed.add(name)
    notice = (f"[lookahead_dist] DeepSpeed will build its {name} op for the config's optimizer: first run only, "
              "about 1-3 minutes (then cached in TORCH_EXTENSIONS_DIR; for Adam/AdamW, "
              '"torch_adam": true in the optimizer params needs no build)')
    if os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0":
        import sys

        print(notice, file=sys.stderr, flush=True)
    return notice
