"""The ``lookahead-dist`` command line: parsing, validation, exit codes, output (no training here)."""

from __future__ import annotations

import json
import math

import pytest

from lookahead_dist import cli
from lookahead_dist.demo.config import RunConfig


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["compare", "--help"], ["--version"]])
def test_help_and_version_exit_zero(argv, capsys):
    code, out, _ = _exit_code(argv, capsys)
    assert code == 0
    assert "lookahead-dist" in out


def test_cli_names_are_the_demos_and_every_mode_has_a_builder():
    from lookahead_dist.demo import config, modes

    assert cli.MODES is modes.MODES is config.MODES
    assert cli.OPTIMIZERS is config.OPTIMIZERS
    assert set(modes._BUILDERS) == set(config.MODES)
    assert set(config.BASELINE_MODES) | set(config.STREAMING_MODES) <= set(config.MODES)


def test_command_is_required(capsys):
    code, _, err = _exit_code([], capsys)
    assert code == 2 and "COMMAND" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--k", "0"], "--k: expected an integer >= 1, got 0"),
        (["train", "--k", "2.5"], "got '2.5'"),
        (["train", "--alpha", "1.5"], "--alpha: expected a number in (0, 1], got 1.5"),
        (["train", "--alpha", "0"], "got 0"),
        (["train", "--alpha", "nan"], "got nan"),
        (["train", "--lr", "-1"], "--lr: expected a positive number, got -1"),
        (["train", "--grad-clip", "-1"], "--grad-clip: expected a number >= 0, got -1"),
        (["train", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
        (["train", "--mode", "zero3"], "invalid choice: 'zero3'"),
        (["train", "--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (["train", "--optimizer", "adamw", "--lookahead"], "not allowed with argument"),
        (["train", "--batch-size", "7"], "--batch-size 7 is not divisible by --nproc 2"),
        (["train", "--batch-size", "8", "--nproc", "3"], "--batch-size 8 is not divisible by --nproc 3"),
        (["train", "--d-model", "130"], "--d-model (130) must be divisible by --heads (4)"),
        (["train", "--mode", "local-sgd", "--no-lookahead"], "needs --optimizer lookahead, got 'adamw'"),
        (["train", "--device", "cuda", "--nproc", "64"], "--device cuda needs one GPU per rank"),
        (["compare", "--runs", "ddp:sgd"], "unknown optimizer 'sgd' in 'ddp:sgd'"),
        (["compare", "--runs", "zero9"], "unknown mode 'zero9'"),
        (["compare", "--runs", ","], "expected a comma-separated list"),
        (["compare", "--runs", "local-sgd:adamw"], "needs --optimizer lookahead"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_exit_2_naming_the_value(argv, needle, capsys):
    code, _, err = _exit_code(argv, capsys)
    assert code == 2
    assert needle in err
    assert f"lookahead-dist {argv[0]}" in err  # the subcommand's usage line


def _configs(argv):
    args = cli.build_parser().parse_args(argv)
    specs = [(args.mode, args.optimizer)] if args.command == "train" else (
        args.runs or [cli._run_spec(s) for s in cli.DEFAULT_RUNS])
    return cli._configs(args, specs)


def test_train_defaults_and_aliases():
    (c,) = _configs(["train", "--device", "cpu"])
    assert (c.mode, c.optimizer, c.k, c.alpha, c.nproc, c.device) == ("ddp", "lookahead", 5, 0.5, 2, "cpu")
    assert (c.steps, c.batch_size, c.eval_batches) == (
        cli.DEFAULTS["steps"], cli.DEFAULTS["batch_size"], cli.DEFAULTS["eval_batches"])
    assert _configs(["train", "--no-lookahead", "--device", "cpu"])[0].optimizer == "adamw"
    assert _configs(["train", "--optimizer", "adamw", "--device", "cpu"])[0].optimizer == "adamw"
    assert _configs(["train", "--lookahead", "--mode", "fsdp2", "--device", "cpu"])[0].name == "fsdp2/lookahead"


def test_quick_shrinks_but_explicit_flags_win():
    (c,) = _configs(["train", "--quick", "--device", "cpu"])
    assert (c.steps, c.batch_size, c.eval_batches) == (
        cli.QUICK["steps"], cli.QUICK["batch_size"], cli.QUICK["eval_batches"])
    (c,) = _configs(["train", "--quick", "--steps", "7", "--device", "cpu"])
    assert (c.steps, c.batch_size) == (7, cli.QUICK["batch_size"])


def test_compare_default_runs_start_with_the_adamw_baseline():
    configs = _configs(["compare", "--device", "cpu", "--k", "4", "--alpha", "0.8"])
    assert [c.name for c in configs] == [s.replace(":", "/") for s in cli.DEFAULT_RUNS]
    assert configs[0].name == "ddp/adamw" and configs[1].name == "ddp/lookahead"
    assert {c.mode for c in configs} == {"ddp", "zero2", "fsdp2", "local-sgd"}
    assert all((c.k, c.alpha) == (4, 0.8) for c in configs)
    assert [c.name for c in _configs(["compare", "--runs", "fsdp2,ddp:adamw", "--device", "cpu"])] == [
        "fsdp2/lookahead", "ddp/adamw"]


def test_nproc_follows_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    (c,) = _configs(["train", "--device", "cpu"])
    assert c.nproc == 4


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"mode": "zero3"}, "unknown mode 'zero3'"),
        ({"optimizer": "sgd"}, "unknown optimizer 'sgd'"),
        ({"k": 0}, "`k` must be an integer >= 1, got 0"),
        ({"k": True}, "`k` must be an integer >= 1, got True"),
        ({"alpha": 0.0}, "`alpha` must be in (0, 1], got 0.0"),
        ({"lr": math.nan}, "`lr` must be a positive number"),
        ({"batch_size": 6, "nproc": 4}, "`batch_size` (6) must be divisible"),
        ({"mode": "local-sgd", "optimizer": "adamw"}, "needs optimizer 'lookahead'"),
        ({"device": "tpu"}, "`device` must be 'cpu' or 'cuda', got 'tpu'"),
        ({"seed": -1}, "`seed` must be an integer >= 0"),
        ({"grad_clip": -0.5}, "`grad_clip` must be >= 0"),
    ],
)
def test_run_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError) as info:
        RunConfig(**kwargs)
    assert needle in str(info.value)


# -- running, with the training replaced by a stub ---------------------------------------------------
def _fake_result(config):
    return {
        "name": config.name, "config": config.as_dict(), "device": "cpu", "backend": "gloo", "world_size": 2,
        "params": 1000, "train_loss_start": 5.0, "train_loss": 3.0, "val_loss": 3.1, "seconds": 2.0,
        "samples_per_s": 100.0, "tokens_per_s": 6400.0, "comm_bytes_per_step": 4000.0,
        "comm_payload_bytes_per_step": 4000.0, "comm_calls_per_step": 1.0, "comm_bytes_by_op": {},
        "slow_bytes_per_rank": [2048, 2048], "optimizer_state_bytes_per_rank": [6144, 6144],
        "param_bytes": 4000, "loss_curve": [[1, 5.0]],
    }


@pytest.fixture
def stub_runs(monkeypatch):
    ran = []

    def fake_run(config, progress, label):
        ran.append(config.name)
        if config.mode == "zero2":
            from lookahead_dist.demo.launch import RankFailure

            raise RankFailure("rank 1: RuntimeError: boom", "--- traceback of rank 1 ---\nTraceback ...")
        return _fake_result(config)

    monkeypatch.setattr(cli, "_run", fake_run)
    return ran


def test_train_prints_table_and_exits_0(stub_runs, capsys):
    assert cli.main(["train", "--mode", "fsdp2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert stub_runs == ["fsdp2/lookahead"]
    assert "fsdp2/lookahead" in out and "5.000 -> 3.000" in out and "3.91 KiB" in out and "2.00 KiB" in out


def test_train_runtime_failure_exits_1_with_one_line(stub_runs, capsys):
    assert cli.main(["train", "--mode", "zero2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "lookahead-dist: error: zero2/lookahead: rank 1: RuntimeError: boom" in err
    assert "Traceback" not in err and "--verbose" in err
    assert cli.main(["train", "--mode", "zero2", "--device", "cpu", "-v"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_unavailable_mode_fails_train_and_is_skipped_by_compare(stub_runs, monkeypatch, capsys, tmp_path):
    from lookahead_dist.demo import modes

    monkeypatch.setattr(modes, "mode_unavailable_reason",
                        lambda mode, opt: "not here" if mode == "local-sgd" else None)
    assert cli.main(["train", "--mode", "local-sgd", "--device", "cpu"]) == 1
    assert "lookahead-dist: error: not here" in capsys.readouterr().err
    assert stub_runs == []

    path = tmp_path / "out.json"
    # compare keeps going past a failed run (exit 1) and a skipped one, and still writes everything.
    assert cli.main(["compare", "--device", "cpu", "--json", str(path)]) == 1
    out = capsys.readouterr().out
    assert stub_runs == ["ddp/adamw", "ddp/lookahead", "zero2/lookahead", "fsdp2/lookahead"]
    assert "local-sgd/lookahead: skipped: not here" in out
    doc = json.loads(path.read_text())
    status = {r["name"]: r.get("status", "ok") for r in doc["runs"]}
    assert status == {"ddp/adamw": "ok", "ddp/lookahead": "ok", "zero2/lookahead": "failed",
                      "fsdp2/lookahead": "ok", "local-sgd/lookahead": "skipped"}


def test_json_dash_prints_json_only(stub_runs, capsys):
    assert cli.main(["compare", "--runs", "ddp:adamw,fsdp2", "--device", "cpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["command"] == "compare"
    assert [r["name"] for r in doc["runs"]] == ["ddp/adamw", "fsdp2/lookahead"]
    assert doc["runs"][1]["config"]["model"]["d_model"] == 128


def test_missing_demo_extra_exits_1_naming_it(stub_runs, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    assert cli.main(["train", "--mode", "ddp", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "needs tqdm" in err and "pip install 'lookahead-dist[demo]'" in err
    assert stub_runs == []
    code, out, _ = _exit_code(["train", "--help"], capsys)  # --help needs nothing beyond torch
    assert code == 0 and "--mode" in out


@pytest.mark.parametrize("launched", [False, True])
def test_entry_leaves_a_launched_rank_through_exit_process(launched, monkeypatch):
    # Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) the console script leaves with
    # exit_process (os._exit after flushing), skipping the interpreter finalization at which torch
    # 2.13's gloo can abort a finished rank; elsewhere a plain sys.exit with main's code.
    import lookahead_dist.distributed as distributed

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if launched:
            monkeypatch.setenv(var, "0" if var != "MASTER_ADDR" else "127.0.0.1")
        else:
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cli, "main", lambda argv=None: 3)
    left = []

    def fake_exit(code=0):
        left.append(code)
        raise SystemExit("exit_process")

    monkeypatch.setattr(distributed, "exit_process", fake_exit)
    with pytest.raises(SystemExit) as info:
        cli.entry()
    assert (info.value.code, left) == (("exit_process", [3]) if launched else (3, []))
