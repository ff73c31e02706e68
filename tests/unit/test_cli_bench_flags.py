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


@pytest.mark.parametrize("argv", [["--outer-momentum", "1.0"], ["--outer-momentum", "x"], ["--comm-dtype", "int3"]])
def test_bad_local_sgd_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--mode", "local-sgd", *argv])
    assert e.value.code == 2 and argv[1] in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, needle", [
    (dict(mode="post-local-sgd", optimizer="lookahead"), "needs optimizer 'adamw'"),
    (dict(mode="ddp", sharded=True), "options of mode 'local-sgd'"),
    (dict(mode="local-sgd", nesterov=True), "nesterov"),
    (dict(mode="torchft-diloco", optimizer="adamw", comm_dtype="int8"), "Triton"),
    (dict(mode="torchft-diloco"), "needs optimizer 'adamw'"),
    (dict(mode="local-sgd", k=16, num_fragments=3), "multiple of `num_fragments`"),
    (dict(mode="local-sgd", k=16, num_fragments=4, fragment_sync_delay=4), r"< k / num_fragments = 4"),
    (dict(mode="ddp", num_fragments=2), "options of modes local-sgd, torchft-diloco"),
    (dict(mode="local-sgd", quant_block_size=256), "int8/int4"),
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


def test_streaming_and_quantisation_flags_reach_the_config():
    (c,) = _configs(["train", "--mode", "local-sgd", "--k", "16", "--num-fragments", "4", "--fragment-sync-delay", "3",
                     "--fragment-update-alpha", "0.5", "--comm-dtype", "int4", "--quant-block-size", "256",
                     "--no-error-feedback", "--device", "cpu"])
    assert (c.num_fragments, c.fragment_sync_delay, c.fragment_update_alpha, c.comm_dtype, c.quant_block_size,
            c.error_feedback) == (4, 3, 0.5, "int4", 256, False)
    (c,) = _configs(["train", "--mode", "local-sgd", "--device", "cpu"])  # defaults: the blocking sync
    assert (c.num_fragments, c.fragment_sync_delay, c.fragment_update_alpha, c.quant_block_size,
            c.error_feedback) == (1, 0, 0.0, 512, True)


def test_torchft_diloco_takes_the_schedule_and_outer_step_flags():
    (c,) = _configs(["train", "--mode", "torchft-diloco", "--k", "16", "--alpha", "0.7", "--num-fragments", "2",
                     "--fragment-sync-delay", "7", "--outer-momentum", "0.9", "--nesterov", "--device", "cpu"])
    assert (c.optimizer, c.k, c.alpha, c.num_fragments, c.fragment_sync_delay, c.outer_momentum, c.nesterov) == (
        "adamw", 16, 0.7, 2, 7, 0.9, True)
    # In a compare, the quantisation flags go to the local-sgd run only.
    ft, ls = _configs(["compare", "--runs", "torchft-diloco,local-sgd", "--k", "16", "--num-fragments", "2",
                       "--comm-dtype", "int8", "--device", "cpu"])
    assert (ft.comm_dtype, ft.num_fragments, ls.comm_dtype, ls.num_fragments) == ("fp32", 2, "int8", 2)


@pytest.mark.parametrize("argv, needle", [
    (["--mode", "torchft-diloco", "--comm-dtype", "int8"], "Triton"),
    (["--mode", "ddp", "--num-fragments", "2"], "--num-fragments"),
    (["--mode", "local-sgd", "--k", "16", "--num-fragments", "3"], "multiple"),
    (["--mode", "local-sgd", "--k", "16", "--num-fragments", "2", "--fragment-sync-delay", "8"], "< k / num_fragments"),
    (["--mode", "local-sgd", "--quant-block-size", "3"], "even"),
    (["--mode", "local-sgd", "--fragment-update-alpha", "1.5"], "[0, 1]"),
    (["--mode", "local-sgd", "--fragment-sync-delay", "-1"], ">= 0"),
    (["--mode", "local-sgd", "--quant-block-size", "256"], "int8/int4"),
])
def test_bad_streaming_flags_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *argv, "--device", "cpu"])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_split_modules_partitions_the_model_by_bytes():
    import torch

    from lookahead_dist.demo.model import ModelConfig, TinyLM
    from lookahead_dist.demo.modes import split_modules

    model = TinyLM(ModelConfig(n_layer=4, d_model=32, n_head=4))
    for f in (1, 2, 4):
        frags = split_modules(model, f)
        # Each parameter once, the same objects (shared, not copied); contiguous runs in parameter order
        # (the direct parameter `pos` comes first, then the children).
        ids = [id(p) for fr in frags for p in fr.parameters()]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())
        assert ids == [id(model.pos)] + [id(p) for _, c in model.named_children() for p in c.parameters()]
        sizes = [sum(p.numel() for p in fr.parameters()) for fr in frags]
        block = sum(p.numel() for p in model.blocks[0].parameters())
        assert max(sizes) - min(sizes) <= 2 * block, sizes  # within a block or two of equal
    assert [sum(p.numel() for p in fr.parameters()) for fr in split_modules(model, 2)] == [
        model.pos.numel() + sum(p.numel() for p in model.tok.parameters()) + 2 * block,
        2 * block + sum(p.numel() for p in model.ln_f.parameters())]
    with torch.no_grad():
        list(split_modules(model, 2)[-1].parameters())[-1].add_(1.0)
    assert torch.equal(model.ln_f.bias, torch.ones_like(model.ln_f.bias))


def test_torchft_diloco_without_lighthouse_says_how_to_start_one(monkeypatch):
    pytest.importorskip("torchft")
    from lookahead_dist.demo.modes import mode_unavailable_reason

    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    assert "TORCHFT_LIGHTHOUSE=http://" in mode_unavailable_reason("torchft-diloco", "adamw")
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://localhost:29510")
    assert mode_unavailable_reason("torchft-diloco", "adamw") is None


def test_eager_and_sparse_flags_reach_the_config():
    (c,) = _configs(["train", "--mode", "local-sgd", "--k", "16", "--num-fragments", "2", "--eager-update",
                     "--comm-dtype", "int2", "--topk-fraction", "0.02", "--device", "cpu"])
    assert (c.eager_update, c.topk_fraction, c.comm_dtype, c.num_fragments) == (True, 0.02, "int2", 2)
    (c,) = _configs(["train", "--mode", "local-sgd", "--eager-update", "naive", "--device", "cpu"])
    assert (c.eager_update, c.topk_fraction) == ("naive", None)
    (c,) = _configs(["train", "--mode", "local-sgd", "--device", "cpu"])
    assert (c.eager_update, c.topk_fraction) == (False, None)
    (c,) = _configs(["train", "--mode", "local-sgd", "--eager-update", "--local-sgd-sharded", "--device", "cpu"])
    assert (c.eager_update, c.sharded) == (True, True)


def test_fused_kernels_flag_reaches_the_config():
    (c,) = _configs(["train", "--mode", "local-sgd", "--comm-dtype", "int8", "--fused-kernels", "--device", "cpu"])
    assert (c.fused_kernels, c.comm_dtype) == (True, "int8")
    (c,) = _configs(["train", "--mode", "local-sgd", "--comm-dtype", "int8", "--device", "cpu"])
    assert c.fused_kernels is False


@pytest.mark.parametrize("argv, needle", [
    (["--mode", "ddp", "--eager-update"], "--eager-update: option(s) of --mode local-sgd"),
    (["--mode", "ddp", "--fused-kernels"], "--fused-kernels: option(s) of --mode local-sgd"),
    (["--mode", "local-sgd", "--fused-kernels"], "fused_kernels=True"),
    (["--mode", "local-sgd", "--comm-dtype", "int2", "--topk-fraction", "0.02", "--fused-kernels"],
     "sparse exchange"),
    (["--mode", "local-sgd", "--eager-update", "eager"], "'naive'"),
    (["--mode", "local-sgd", "--topk-fraction", "0"], "(0, 1]"),
    (["--mode", "local-sgd", "--topk-fraction", "0.02"], "comm_dtype='int8', 'int4' or 'int2'"),
    (["--mode", "local-sgd", "--k", "4", "--eager-update", "--fragment-sync-delay", "1"], "fragment_sync_delay=1"),
])
def test_bad_eager_and_sparse_flags_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *argv, "--device", "cpu"])
    assert e.value.code == 2 and needle in capsys.readouterr().err
