"""`cbs <stage> ...`: a thin shell that loads a config, applies `--set` overrides and calls the stage's main().

Stages: preprocess | pretrain | evaluate | fit | forecast | study | status. Heavy imports (torch, deepspeed,
megatron-core) happen inside the stage that needs them, so `cbs --help` and `cbs fit` start fast.
Exit codes: 0 done, 2 bad input (the message says which key or file and how to fix it), 1 unexpected failure,
75 pretrain stopped by SIGTERM/SIGUSR1/SIGINT after saving a checkpoint (start it again to continue), 130 a study
stopped by Ctrl-C or SIGTERM, 141 the reader of the output went away (`cbs ... | head`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from cbs import __version__

def _add_config_args(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("config", help="the stage's YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, dotted for nested keys (repeatable): --set {example}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbs", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"cbs {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    p = sub.add_parser("preprocess", help="corpus -> SentencePiece tokenizer -> Megatron .bin/.idx shards")
    _add_config_args(p, "tokenizer.vocab_size=4096")
    p.add_argument("--force", action="store_true", help="rebuild even if output_dir is up to date, replacing it")

    p = sub.add_parser("pretrain", help="train one GPT run (megatron-core layers in a DeepSpeed engine)")
    _add_config_args(p, "optimizer.lr=1e-3")
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("evaluate", help="held-out loss of a checkpoint's raw and EWA weights -> eval.json")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="pretrain run directories (several: one process)")
    p.add_argument("--checkpoint", default="latest", help="latest (default) or a step number")
    p.add_argument("--eval-tokens", type=int, default=None, help="tokens to evaluate (default: the run's)")
    p.add_argument("--data-dir", default=None, help="another preprocessed data dir (default: the run's)")
    p.add_argument("--out", default=None, help="where to write (default RUN_DIR/eval.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("study", help="a whole study: preprocess -> runs -> evaluate -> fit, local or on Slurm")
    _add_config_args(p, "base.optimizer.weight_decay=0.05 (a study's keys; `base.` for its runs' pretrain keys)")
    p.add_argument("--out", required=True, help="the study directory")
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local (default): runs as processes on this machine, --parallel at a time; slurm: each "
                        "phase as sbatch jobs (an array per phase), this command waits for them")
    p.add_argument("--parallel", type=int, default=None,
                   help="local: runs trained at once (default: 1 on a CPU machine, visible GPUs / --gpus-per-run on a "
                        "GPU machine; with --gpus-per-run 1, more runs than GPUs share them round-robin: faster for "
                        "small models, whose step leaves a GPU mostly idle)")
    p.add_argument("--gpus-per-run", type=int, default=1,
                   help="local: GPUs of each run (CUDA_VISIBLE_DEVICES is split among parallel runs; > 1: torchrun)")
    p.add_argument("--progress-every", type=float, default=None, metavar="SECONDS",
                   help="local: print the running runs' step, tokens, loss and ETA this often (default 20)")
    p.add_argument("--dry-run", action="store_true", help="print the runs (and sbatch scripts) without running")
    p.add_argument("--force", action="store_true", help="use a directory that holds another study")
    for flag, kind in (("partition", str), ("account", str), ("nodes", int), ("gpus-per-node", int),
                       ("cpus-per-task", int), ("time", str), ("max-parallel", int)):
        p.add_argument(f"--{flag}", type=kind, default=None, help=f"slurm: overrides study.slurm.{flag.replace('-', '_')}")

    p = sub.add_parser("status", help="a table of a study's runs: status, steps, targets reached")
    p.add_argument("study_dir")

    sub.add_parser("fit", help="steps-vs-batch fits, CBS with intervals, scaling laws, report", add_help=False)
    sub.add_parser("forecast", help="CBS forecast and batch plan from a fit's scaling.json", add_help=False)
    return parser


def _setup_logging() -> None:
    # only our logger at INFO: megatron-core logs chatter at INFO through the root logger
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[cbs %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    handler.set_name("cbs-cli")
    logger = logging.getLogger("cbs")
    for old in [h for h in logger.handlers if h.get_name() == "cbs-cli"]:  # main() called again in one process
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _run_pretrain(args) -> int:
    from cbs.pipeline import pretrain
    from cbs.pipeline.distributed import shutdown_distributed
    from cbs.runfiles import SETTLED, Status

    result = pretrain.main(pretrain.load(args.config, args.overrides))
    shutdown_distributed()  # a run that ended (even preempted or diverged): every rank got here
    if result["status"] == Status.PREEMPTED:
        return pretrain.EXIT_PREEMPTED  # checkpointed: start it again to continue (jobs/pretrain.sbatch requeues)
    return 0 if result["status"] in SETTLED else 1


def _run_evaluate(args) -> int:
    from cbs.pipeline import evaluate
    from cbs.pipeline.distributed import shutdown_distributed

    if args.out and len(args.run_dirs) > 1:
        print("cbs evaluate: error: --out needs a single RUN_DIR", file=sys.stderr)
        return 2
    failed = []
    for run_dir in args.run_dirs:  # keep going: one bad run does not stop the others
        try:
            evaluate.main(run_dir, args.checkpoint, args.eval_tokens, args.data_dir, args.out)
        except evaluate.EvaluateError as e:
            if len(args.run_dirs) == 1:
                raise
            failed.append(run_dir)
            print(f"cbs evaluate: {run_dir}: error: {e}", file=sys.stderr)
    shutdown_distributed()
    return 2 if failed else 0


def _run_study(args) -> int:
    from cbs.pipeline import study
    from cbs.pipeline.executors import StudyInterrupted
    from cbs.pipeline.config import StudyConfig, load_config

    cfg = load_config(StudyConfig, args.config, args.overrides)
    slurm = {k: getattr(args, k) for k in ("partition", "account", "nodes", "gpus_per_node", "cpus_per_task",
                                           "time", "max_parallel") if getattr(args, k) is not None}
    try:
        return study.main(cfg, args.out, args.executor, args.parallel, args.dry_run, args.force, slurm,
                          args.gpus_per_run, args.progress_every)
    except StudyInterrupted as e:
        print(f"cbs study: {e}", file=sys.stderr)
        return 130


def _run_status(args) -> int:
    from cbs.pipeline import study

    print(study.status_table(args.study_dir))
    return 0


def _run_preprocess(args) -> int:
    from cbs.pipeline import preprocess
    from cbs.pipeline.config import PreprocessConfig, load_config

    cfg = load_config(PreprocessConfig, args.config, args.overrides)
    preprocess.main(cfg, force=args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # the reader of our output went away (`cbs study ... --dry-run | head`): stop quietly, as `cat` does.
        # stdout is pointed at /dev/null so that the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a broken pipe


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `deepspeed --module cbs.pipeline.cli ...` puts --local_rank=N first, before the stage; LOCAL_RANK says the same
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if argv and argv[0] in ("fit", "forecast"):  # argparse of their own, in cbs/analysis/ (no torch import)
        from cbs.analysis import cli as analysis_cli

        return (analysis_cli.fit_main if argv[0] == "fit" else analysis_cli.forecast_main)(argv[1:])
    args = _parser().parse_args(argv)
    _setup_logging()
    from cbs.pipeline.config import ConfigError
    from cbs.pipeline.corpus import CorpusError
    from cbs.pipeline.preprocess import PreprocessError

    from cbs.pipeline.data import DataError
    from cbs.pipeline.evaluate import EvaluateError
    from cbs.pipeline.rundir import CheckpointError, RunDirBusy
    from cbs.pipeline.study import StudyError

    try:
        stages = {"preprocess": _run_preprocess, "pretrain": _run_pretrain, "evaluate": _run_evaluate,
                  "study": _run_study, "status": _run_status}
        return stages[args.stage](args)
    except (ConfigError, CorpusError, PreprocessError, DataError, EvaluateError, StudyError,
            CheckpointError, RunDirBusy) as e:
        print(f"cbs {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        fix = _write_fix(e)
        if fix is None:
            raise
        print(f"cbs {args.stage}: error: cannot write {e.filename or 'the output'}: {e.strerror}; {fix}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cbs {args.stage}: interrupted; nothing was written", file=sys.stderr)
        return 130


def _write_fix(e: OSError) -> str | None:
    """The fix for an output path that cannot be written (read-only, full, a file where a directory goes); None for
    any other OSError, which stays a traceback (a bug to report, not bad input)."""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make that directory writable, or choose another output path"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ("free disk space (or choose another output path) and run the same command again: complete outputs "
                "and checkpoints are kept, and a run resumes from its newest complete checkpoint")
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return "a file stands where a directory is needed (or the reverse): choose another output path"
    return None


if __name__ == "__main__":
    sys.exit(main())
