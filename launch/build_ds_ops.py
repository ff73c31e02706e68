"""Build the DeepSpeed ops the test suite needs, once (``launch/test.sh`` calls this).

DeepSpeed JIT-compiles its C++ optimizers the first time one is used and caches the result in
``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR``). Without this step a fresh machine would
skip every test case that needs one, so the suite would check less there than on a warm machine.
Each op takes 1-3 minutes on 2 cores the first time and nothing afterwards (a cached op loads
in well under a second). Ops already built, or prebuilt into DeepSpeed, are left alone.

    python launch/build_ds_ops.py            # the ops the tests use
    python launch/build_ds_ops.py cpu_adam   # only these
"""

from __future__ import annotations

import os
import sys
import time

# op name -> DeepSpeed builder class name (as the accelerator's ``create_op_builder`` knows it)
OPS = {
    "fused_adam": "FusedAdamBuilder",
    "cpu_adam": "CPUAdamBuilder",
    "cpu_adagrad": "CPUAdagradBuilder",
    "cpu_lion": "CPULionBuilder",
    # The CPU accelerator's shared-memory collectives, which a plain deepspeed.initialize builds at
    # start-up (the doc blocks that call it need it; our initialize skips it).
    "deepspeed_shm_comm": "ShareMemCommBuilder",
}


def built(name: str) -> bool:
    """The op loads without compiling: prebuilt into DeepSpeed, or in the JIT cache *for this
    environment*. A cached build made from another virtualenv (its command lines name that one's
    torch) or older than DeepSpeed's sources (a fresh install) is rebuilt by the JIT at its first
    load, in whichever test loads it first, inside that test's timeout: so it counts as not built."""
    import deepspeed
    import torch
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    if installed_ops.get(name):
        return True
    where = _get_build_directory(name, verbose=False)
    so, ninja = os.path.join(where, f"{name}.so"), os.path.join(where, "build.ninja")
    if not (os.path.exists(so) and os.path.exists(ninja)):
        return False
    with open(ninja) as f:
        if os.path.dirname(torch.__file__) not in f.read():
            return False
    csrc = os.path.join(os.path.dirname(deepspeed.__file__), "ops", "csrc")
    newest = max((os.path.getmtime(os.path.join(d, f)) for d, _, files in os.walk(csrc) for f in files), default=0.0)
    return os.path.getmtime(so) >= newest


STALE_LOCK_S = 20 * 60  # a build takes 1-3 minutes; a lock this old was left by a killed build


def clear_stale_lock(name: str) -> None:
    """Remove the JIT build lock a killed build left behind (torch waits on it forever otherwise)."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return
    if age > STALE_LOCK_S:
        print(f"[build_ds_ops] {name}: removing a build lock left {age / 60:.0f} minutes ago by a killed build: "
              f"{lock}", file=sys.stderr)
        os.remove(lock)


def main(names: list[str]) -> int:
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        print("[build_ds_ops] DeepSpeed is not installed: nothing to build", file=sys.stderr)
        return 0
    unknown = [n for n in names if n not in OPS]
    if unknown:
        print(f"[build_ds_ops] unknown op(s) {unknown}; known: {sorted(OPS)}", file=sys.stderr)
        return 2
    # One at a time: each build already uses every core (two at once took 271 s for the five
    # ops against 249 s one by one on the 2-core test machine, 2026-12-07).
    accelerator = get_accelerator()
    failed = []
    for name in (n for n in names if not built(n)):
        builder = accelerator.create_op_builder(OPS[name])
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"[build_ds_ops] {name}: no build for the {accelerator._name} accelerator; skipped",
                  file=sys.stderr)
            continue
        clear_stale_lock(name)
        print(f"[build_ds_ops] building DeepSpeed op {name} (first run in this environment, about 1-3 minutes)",
              file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            builder.load(verbose=False)
        except Exception as exc:  # noqa: BLE001 - report every op, then fail
            print(f"[build_ds_ops] {name} failed to build: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"[build_ds_ops] {name} built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(OPS)))
