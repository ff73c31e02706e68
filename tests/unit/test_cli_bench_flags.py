"""The trainer flags the benchmarks use: local-SGD options, baseline modes, corpus."""

from __future__ import annotations

import pytest

from lookahead_dist import cli
from lookahead_dist.demo.config import RunConfig


def _configs(argv):
    args = cli.build_parser().parse_args(argv)
    specs = [(args.mode, args.optimizer)] if args.command == "train" else args.runs
    return cli._configs(args, specs)


def test_local_sgd_flags_reach_the_config():
    (c,) = _configs(["train", "--mode", "local-sgd", "--k", "16", "--outer-momentum", "0.9", "--nesterov",
                     "--local-sgd-sharded", "--hierarchical", "--device", "cpu"])
    assert (c.outer_momentum, c.nesterov, c.sharded, c.hierarchical, c.comm_dtype) == (0.9, True, True, True, "fp32")
    (c,) = _configs(["train", "--mode", "local-sgd", "--comm-dtype", "bf16", "--device", "cpu"])
    assert c.comm_dtype == "bf16" and not c.sharded


def test_baselines_default_to_adamw_and_options_stay_with_local_sgd():
    (c,) = _configs(["train", "--mode", "post-local-sgd", "--device", "cpu"])
    assert c.optimizer == "adamw"
    runs = _configs(["compare", "--runs", "ddp:adamw,accelerate-local-sgd,local-sgd", "--outer-momentum", "0.5",
                     "--device", "cpu"])
    assert [(r.mode, r.optimizer, r.outer_momentum) for r in runs] == [
        ("ddp", "adamw", 0.0), ("accelerate-local-sgd", "adamw", 0.0), ("local-sgd", "lookahead", 0.5)]


@pytest.mark.parametrize("argv", [["--outer-momentum", "1.0"], ["--outer-momentum", "x"], ["--comm-dtype", "int8"]])
def test_bad_local_sgd_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--mode", "local-sgd", *argv])
    assert e.value.code == 2 and argv[1] in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, needle", [
    (dict(mode="post-local-sgd", optimizer="lookahead"), "needs optimizer 'adamw'"),
    (dict(mode="ddp", sharded=True), "options of mode 'local-sgd'"),
    (dict(mode="local-sgd", nesterov=True), "nesterov"),
    (dict(mode="local-sgd", comm_dtype="int8"), "int8"),
    (dict(corpus="wiki"), "wiki"),
])
def test_run_config_rejects(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        RunConfig(**kwargs)


def test_stdlib_corpus_is_python_source():
    from lookahead_dist.demo.data import load_corpus

    c = load_corpus("stdlib")
    text = bytes(c.train[:100_000].tolist()).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text and c.val.numel() > 50_000
    with pytest.raises(ValueError, match="unknown corpus 'x'"):
        load_corpus("x")
