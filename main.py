"""Run a class-incremental experiment: every step of the configured task.

    python main.py --config configs/demo.yaml
    python main.py --config configs/voc.yaml --opt data.task=10-1 method.name=baseline
    torchrun --nproc_per_node=4 main.py --config configs/voc.yaml
    python main.py --config configs/voc.yaml --resume          # continue an interrupted run
    python main.py --config configs/voc.yaml --eval-only --step 5
"""
from __future__ import annotations

import argparse
import os
import sys

from utils.config import ConfigError, batch_per_process, full_size_model, load_config
from utils.errors import RunInterrupted, StopSignal, UserError, ignore_stop_signals, one_line, stop_signals_raising
from utils.run_folder import RunFolder, RunFolderError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--opt", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. train.lr=0.01 data.task=15-5")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output_dir/name: skip finished steps, resume the interrupted one")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the finished checkpoint of --step")
    parser.add_argument("--step", type=int, default=None, help="step to evaluate with --eval-only (default: last)")
    # python -m torch.distributed.launch passes --local_rank (older) or --local-rank (newer)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with stop_signals_raising():  # a stop signal anywhere ends in one line (the step loop saves first)
            return run(args)
    except StopSignal as stop:
        print(f"stopped by {stop} before the training loop could save anything in progress: every finished step "
              "is kept; run the same command (with --resume once a step has finished) to continue",
              file=sys.stderr)
        return 128 + stop.signum


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.opt)
        if not args.eval_only:
            RunFolder(cfg.run_dir).check_writable()  # before a log file is opened there or any data is read
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except RunFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # Heavy imports after the config is known to be valid, so config errors come back fast.
    from trainer.incremental import IncrementalTrainer
    from utils.distributed import cleanup, init_distributed
    from utils.logs import setup_logger

    try:  # before any process group exists: every rank stops here alike, the first of each node says why
        ctx = init_distributed(cfg.device, args.local_rank, full_size_model(cfg))
    except ConfigError as err:
        local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank == 0:
            print(f"config error: {err}", file=sys.stderr)
        return 2
    failed = True  # every way out, error or not, tears the process group down through cleanup()
    try:
        log = setup_logger(None if args.eval_only else RunFolder(cfg.run_dir).log_file, ctx.is_main)
        try:
            if args.eval_only:
                from trainer.evaluator import evaluate_finished_step
                from utils.results import format_step_table
                summary = evaluate_finished_step(cfg, ctx, args.step)
                if ctx.is_main:
                    print(format_step_table([summary]))
            else:
                refuse_batch_too_large_for_gpu(cfg, ctx)
                IncrementalTrainer(cfg, ctx, resume=args.resume).run()
                if ctx.is_main and cfg.train.qualitative_figure:
                    from analysis.figures import write_qualitative_figure
                    write_qualitative_figure(cfg.run_dir, cfg.train.qualitative_figure,
                                             cfg.train.qualitative_images or 4, ctx.device)
                    log.info("qualitative figure: %s", cfg.train.qualitative_figure)
        except UserError as err:
            # Bad input (config, data, run folder, checkpoint, weights): one clear line, no traceback.
            # Anything else is a bug and keeps its traceback.
            log.error("%s: %s", type(err).__name__, one_line(err))
            return 2
        except RunInterrupted as stop:  # every rank stopped after the same iteration, its work saved
            failed = False
            ignore_stop_signals()  # a second Ctrl-C must not cut the clean-up short with a traceback
            log.error("%s; run the same command with --resume to continue from there", stop)
            return 128 + stop.signum
        failed = False
    finally:
        cleanup(failed)
    return 0


def refuse_batch_too_large_for_gpu(cfg, ctx) -> None:
    """On CUDA, refuse in one line a per-GPU batch whose estimated peak memory exceeds the card
    (utils/gpu_memory.py), instead of an out-of-memory error in the middle of a step."""
    if ctx.device.type != "cuda":
        return
    import torch

    from trainer.step import effective_precision
    from utils.gpu_memory import check_batch_fits
    properties = torch.cuda.get_device_properties(ctx.device)
    check_batch_fits(cfg, batch_per_process(cfg.train.batch_size, ctx.world_size),
                     effective_precision(ctx.device, cfg.train.amp), properties.name, properties.total_memory / 2**30)


if __name__ == "__main__":
    sys.exit(main())
