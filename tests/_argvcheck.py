"""Check that Python command lines parse, without running them.

``python tests/_argvcheck.py '<json list of argv lists>'`` prints one JSON line: a list of
``null`` (parsed) or an error string, one per argv. Each argv is what follows the interpreter
(``["-m", "benchmarks.faults", "--timeout", "5"]``, ``["launch/train_example.py", "--local-sgd"]``).
The program is started as ``python`` would start it, with ``argparse`` patched so that the first
complete top-level parse stops it: its imports run, its training does not. torchrun and
``accelerate launch`` are parsed with their own parsers, then the script they would start is
checked the same way; for pytest the named test paths must exist.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import sys


class _Parsed(BaseException):
    pass


_depth = 0
_orig = argparse.ArgumentParser.parse_known_args


def _parse_known_args(self, args=None, namespace=None):
    global _depth
    _depth += 1
    try:
        ns, extra = _orig(self, args, namespace)
    finally:
        _depth -= 1
    if _depth == 0:
        raise _Parsed(ns, extra)
    return ns, extra


def _launcher_parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """A launcher's own parse, not stopped by the patch."""
    global _depth
    _depth += 1
    try:
        return parser.parse_args(args)
    finally:
        _depth -= 1


def _run_program(argv: list[str]) -> str | None:
    if argv[0] == "-m":
        target, args = argv[1], argv[2:]
        run = lambda: runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif argv[0].endswith(".py"):
        target, args = argv[0], argv[1:]
        if not os.path.exists(target):
            return f"{target}: no such file"
        run = lambda: runpy.run_path(target, run_name="__main__")
    else:
        return f"cannot check {argv!r}"
    if target == "torch.distributed.run":
        from torch.distributed.run import get_args_parser

        ns = _launcher_parse(get_args_parser(), args)
        inner = ([] if ns.no_python else (["-m"] if ns.module else [])) + [ns.training_script, *ns.training_script_args]
        if ns.no_python:  # a console script: only lookahead-dist is expected
            if ns.training_script != "lookahead-dist":
                return f"torchrun --no-python {ns.training_script}: unknown console script"
            inner = ["-m", "lookahead_dist.cli", *ns.training_script_args]
        return _run_program(inner)
    if target == "accelerate.commands.launch":
        from accelerate.commands.launch import launch_command_parser

        ns = _launcher_parse(launch_command_parser(), args)
        if ns.config_file and not os.path.exists(ns.config_file):
            return f"accelerate config {ns.config_file}: no such file"
        return _run_program([ns.training_script, *ns.training_script_args])
    if target == "pytest":
        paths = [a.split("::")[0] for a in args if not a.startswith("-")]
        missing = [p for p in paths if not os.path.exists(p)]
        return f"pytest paths missing: {missing}" if missing else None
    saved = sys.argv
    sys.argv = [target, *args]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            run()
    except _Parsed as e:
        ns, extra = e.args
        if extra:
            return f"unrecognised arguments {extra}"
        if target.endswith("netcluster.py") and ns.torchrun:  # the program every node's torchrun starts
            cmd = ns.command[1:] if ns.command[:1] == ["--"] else list(ns.command)
            if cmd[:1] == ["lookahead-dist"]:
                cmd = ["-m", "lookahead_dist.cli", *cmd[1:]]
            return _run_program(cmd) if cmd[:1] == ["-m"] or os.path.exists(cmd[0]) else None
        return None
    except SystemExit as e:
        return None if e.code in (0, None) else f"exit {e.code}: {out.getvalue().strip()[-500:]}"
    finally:
        sys.argv = saved
    return f"{target} ran to the end without parsing its arguments with argparse"


def main() -> None:
    argparse.ArgumentParser.parse_known_args = _parse_known_args
    sys.path.insert(0, os.getcwd())  # as `python -m` and a command typed in the repository root see it
    results = []
    for argv in json.loads(sys.argv[1]):
        try:
            results.append(_run_program(argv))
        except SystemExit as e:  # a launcher's own parser refused its options
            results.append(f"launcher options refused (exit {e.code})")
        except Exception as e:  # noqa: BLE001 - reported per command
            results.append(f"{type(e).__name__}: {e}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
