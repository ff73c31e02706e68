"""The command line: ``python -m lookahead_dist.deepspeed to-universal IN OUT`` (:func:`.convert_to_universal`)."""

from __future__ import annotations

from .universal import convert_to_universal


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lookahead_dist.deepspeed",
                                     description="DeepSpeed helpers of lookahead-dist")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("to-universal", help="ds_to_universal that keeps the Lookahead slow weights and counters")
    conv.add_argument("input_folder", help="a ZeRO checkpoint tag folder (e.g. ckpt/global_step100)")
    conv.add_argument("output_folder", help="the universal checkpoint folder to write (e.g. ckpt/global_step100_universal)")
    conv.add_argument("--inject-missing-state", action="store_true", help="as ds_to_universal --inject_missing_state")
    conv.add_argument("--num-workers", type=int, default=1, help="processes for ds_to_universal's extract and merge")
    conv.add_argument("--keep-temp-folder", action="store_true")
    conv.add_argument("--trust-pickle", action="store_true",
                      help="skip the check that every input file loads with weights_only=True (only for files "
                           "you trust: DeepSpeed's converter unpickles them in full)")
    args = parser.parse_args(argv)
    convert_to_universal(args.input_folder, args.output_folder, inject_missing_state=args.inject_missing_state,
                         num_workers=args.num_workers, keep_temp_folder=args.keep_temp_folder, verbose=True,
                         trust_pickle=args.trust_pickle)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
