"""``dsq`` command line: train, prepare, eval, config, mlflow, report, ckpt, bench.

Every subcommand answers ``--help``; ``dsq --version`` prints the version. Errors a user can
fix print one ``dsq: error: ...`` line and exit 2 (a training run that diverged, or whose
checkpoint could not be written, e.g. on a full disk: one such line and exit 1); Ctrl-C exits
130 without a traceback (``dsq train`` checkpoints first, as on SIGTERM). ``--verbose`` (or
``DSQ_LOG_LEVEL=INFO``) shows the libraries' INFO logging, hidden by default.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import warnings
from typing import List, Optional, Tuple

from dsq.log import ArgParser

USAGE = """dsq <command> ... [--verbose]     (dsq <command> --help, dsq --version)

commands:
  train CONFIG... [key.sub=value ...]   pre-train (under deepspeed/torchrun/srun, or one process)
  prepare CONFIG... [key.sub=value ...] [--workers N] [--verify]   tokenize and pack the data
  eval RUN_OR_CHECKPOINT --data PATH... [--json OUT]   loss and perplexity of a checkpoint
  export RUN_OR_CHECKPOINT OUT_DIR [--weights quantized|trained]   as a transformers GPT-2 / Llama model
  generate RUN_OR_CHECKPOINT --prompt TEXT [--max-new-tokens N --temperature T --top-k K --seed S]
  config CONFIG... [key.sub=value ...] [--world-size N] [--memory]  validate and print the resolved
                                        config (--memory: the memory per GPU)
  mlflow sync RUN_DIR... [--tracking-uri URI]   upload what a run could not send to MLflow
  report --experiment NAME [--tracking-uri URI] [--out DIR]   the recipes' comparison table + plot
  ckpt reshard CKPT_DIR --dp N [--tag T] [--out DIR]   convert a ZeRO checkpoint to another DP size
  bench optim|linear|train|prepare|quant ...  benchmarks (tables, --json)
"""


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, the shell's code for Ctrl-C


def split_args(args: List[str]) -> Tuple[List[str], List[str]]:
    """YAML paths vs ``key=value`` overrides."""
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return files, overrides


def _fail(msg: str, code: int = 2) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"dsq: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _load(args: List[str], world_size: Optional[int] = None):
    from dsq.config import ConfigError, load_config

    files, overrides = split_args(args)
    try:
        return load_config(files, overrides, world_size=world_size)
    except ConfigError as e:
        _fail(str(e))


CONFIG_HELP = ("CONFIG... are YAML files (configs/), applied in order; key.sub=value overrides "
               "come after them (e.g. train.steps=100 data.train=/path/to/texts). "
               "Every key: dsq/schema.py, or `dsq config configs/tiny.yaml`.")


def _config_parser(cmd: str, description: str) -> argparse.ArgumentParser:
    p = ArgParser(prog=f"dsq {cmd}", description=description, epilog=CONFIG_HELP,
                                usage=f"dsq {cmd} CONFIG... [key.sub=value ...] [options]")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value", help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true",
                   help="show the launcher's and libraries' INFO logging (or DSQ_LOG_LEVEL=INFO)")
    return p


def _parse_config_args(cmd: str, description: str, argv: List[str], **extra):
    p = _config_parser(cmd, description)
    for flag, kw in extra.items():
        p.add_argument(flag, **kw)
    ns = p.parse_intermixed_args(argv)  # options may come between the configs and overrides
    if not ns.args:
        p.print_usage(sys.stderr)
        print(f"dsq {cmd}: error: give at least one config file, e.g. dsq {cmd} "
              f"configs/tiny.yaml", file=sys.stderr)
        sys.exit(2)
    if ns.verbose:
        os.environ["DSQ_LOG_LEVEL"] = "INFO"
    return ns


def cmd_train(argv: List[str]) -> None:
    ns = _parse_config_args("train", "Pre-train a GPT (one process, or one rank under deepspeed/"
                            "torchrun/srun: launch/local.sh, slurm/pretrain.sbatch).", argv)
    from dsq.runtime import quiet_libraries, set_threads_per_rank

    quiet_libraries()
    from dsq.config import ConfigError, check_paths
    from dsq.data.prepare import DataError
    from dsq.parallel import env_from_launcher, shutdown

    env = env_from_launcher()
    cfg = _load(ns.args, world_size=env.world_size)
    from dsq.data.prepare import unprepared_too_big

    try:
        too_big = unprepared_too_big(cfg.data, cfg.model.vocab_size)
    except DataError as e:
        _fail(str(e))
    if too_big:
        args = " ".join(ns.args)
        _fail(f"{too_big}: prepare it first, as its own job: dsq prepare {args} (on a cluster: "
              f"sbatch slurm/prepare.sbatch {args}), then start dsq train again")
    try:
        check_paths(cfg)
        from dsq.runtime import resolve_kernels

        resolve_kernels(cfg)  # an unknown $DSQ_*_KERNEL, or native for fp8 optimizer states
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    set_threads_per_rank()
    from dsq.run.diskfull import CheckpointWriteError
    from dsq.run.rundir import RunDirError
    from dsq.train.health import Diverged
    from dsq.train.stop import PREEMPTED_EXIT_CODE, Preempted
    from dsq.train import run

    try:
        run(cfg, env)
    except (DataError, RunDirError) as e:
        _fail(str(e))
    except (Diverged, CheckpointWriteError) as e:  # a fault of the run, not its input: exit 1
        _fail(str(e), code=1)
    except Preempted as e:
        shutdown()
        sys.exit(INTERRUPTED_EXIT_CODE if e.signum == signal.SIGINT else PREEMPTED_EXIT_CODE)
    finally:
        shutdown()


def cmd_prepare(argv: List[str]) -> None:
    ns = _parse_config_args(
        "prepare", "Tokenize and pack the data of a config (data.*, model.vocab_size) into "
        "data.cache_dir; prints the folder. A killed preparation resumes where it stopped when "
        "the same command runs again (docs/data.md).", argv,
        **{"--workers": dict(type=int, default=None, help="tokenizer processes (data.workers; "
                             "default: the cores of the node)"),
           "--verify": dict(action="store_true", help="re-hash the sources and the prepared "
                            "token files in full (a start compares sizes and modification "
                            "times); prepare again what changed")})
    from dsq.runtime import quiet_libraries

    quiet_libraries()
    from dsq.config import ConfigError, check_paths
    from dsq.data.prepare import DataError, prepare

    cfg = _load(ns.args)
    if ns.workers is not None:
        if ns.workers < 1:
            _fail(f"--workers {ns.workers} must be >= 1")
        cfg.data.workers = ns.workers
    try:
        check_paths(cfg)
        path = prepare(cfg.data, cfg.model.vocab_size, verify_full=ns.verify)
    except (DataError, ConfigError) as e:
        _fail(str(e))
    print(path)


def cmd_config(argv: List[str]) -> None:
    ns = _parse_config_args(
        "config", "Validate a config and print it resolved (YAML).", argv,
        **{"--world-size": dict(type=int, default=None,
                                help="also check the parallel layout for this many ranks"),
           "--check-paths": dict(action="store_true",
                                 help="also check that train.out_dir and data.cache_dir can be "
                                      "written (launch/local.sh does)"),
           "--memory": dict(action="store_true",
                            help="print the memory per GPU instead (model states with fp32 and "
                                 "8-bit optimizer states, activations per micro-batch with "
                                 "each train.recompute mode) for --world-size ranks (default: "
                                 "parallel.tp)")})
    from dsq.config import ConfigError, check_paths, to_yaml

    cfg = _load(ns.args, world_size=ns.world_size)
    if ns.check_paths:
        try:
            check_paths(cfg)
        except ConfigError as e:
            _fail(str(e))
    if ns.memory:
        from dsq.tools.memory import memory_table

        print(memory_table(cfg, ns.world_size or cfg.parallel.tp), end="")
        return
    print(to_yaml(cfg), end="")


def cmd_eval(argv: List[str]) -> None:
    p = ArgParser(prog="dsq eval", description="Loss and perplexity of a checkpoint")
    p.add_argument("checkpoint", help="run directory, its checkpoints/ folder, or one checkpoint")
    p.add_argument("--data", nargs="+", required=True, help="text files or folders")
    p.add_argument("--json", default=None, help="write {loss, ppl, tokens} here")
    p.add_argument("--max-seqs", type=int, default=None, help="evaluate at most this many windows")
    ns = p.parse_args(argv)
    from dsq.data.prepare import DataError
    from dsq.run.load import CheckpointError
    from dsq.tools.evaluate import EvalError, evaluate_checkpoint

    try:
        result = evaluate_checkpoint(ns.checkpoint, ns.data, ns.max_seqs)
    except (CheckpointError, EvalError, DataError) as e:
        _fail(str(e))
    print(f"loss {result['loss']:.4f}  ppl {result['ppl']:.2f}  tokens {result['tokens']:,}  "
          f"({result['checkpoint']})")
    if ns.json:
        import json

        with open(ns.json, "w") as fh:
            json.dump(result, fh, indent=2)


def cmd_export(argv: List[str]) -> None:
    p = ArgParser(prog="dsq export", description="Write a checkpoint as a Hugging "
                                "Face transformers model directory (GPT2LMHeadModel, or "
                                "LlamaForCausalLM for model.positions=rope)")
    p.add_argument("checkpoint", help="run directory, its checkpoints/ folder, or one checkpoint")
    p.add_argument("out_dir", help="new directory to create")
    p.add_argument("--weights", choices=["quantized", "trained"], default="quantized",
                   help="for weight-quantizing recipes: the quantized-dequantized weights the run "
                        "computed with (default: the model that was trained and evaluated) or "
                        "the full-precision master weights")
    ns = p.parse_args(argv)
    from dsq.run.load import CheckpointError
    from dsq.tools.export import ExportError, export

    try:
        info = export(ns.checkpoint, ns.out_dir, ns.weights)
    except (CheckpointError, ExportError) as e:
        _fail(str(e))
    print(f"exported {info['checkpoint']} -> {ns.out_dir} ({info['architecture']}, "
          f"{info['weights']} weights)")


def cmd_generate(argv: List[str]) -> None:
    p = ArgParser(prog="dsq generate", description="Continue a prompt with a "
                                "checkpoint (the run's quantization applied, as in dsq eval)")
    p.add_argument("checkpoint", help="run directory, its checkpoints/ folder, or one checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:N")
    ns = p.parse_args(argv)
    from dsq.run.load import CheckpointError
    from dsq.tools.generate import GenerateError, generate

    try:
        out = generate(ns.checkpoint, ns.prompt, ns.max_new_tokens, ns.temperature, ns.top_k,
                       ns.seed, ns.device)
    except (CheckpointError, GenerateError) as e:
        _fail(str(e))
    print(out["text"])


def cmd_mlflow(argv: List[str]) -> None:
    p = ArgParser(prog="dsq mlflow")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sync", help="upload a run directory's metrics and artifacts to MLflow")
    s.add_argument("run_dir", nargs="+")
    s.add_argument("--tracking-uri", default=None, help="default: the run's tracking.uri")
    ns = p.parse_args(argv)
    from dsq.tracking import sync_run

    for run_dir in ns.run_dir:
        try:
            sync_run(run_dir, ns.tracking_uri)
        except FileNotFoundError as e:
            _fail(str(e))
        except Exception as e:  # the server is down, refuses, ...
            _fail(f"could not sync {run_dir}: {type(e).__name__}: {str(e).splitlines()[0]}; "
                  f"start the server (launch/mlflow_server.sh) or check --tracking-uri", 1)


def cmd_report(argv: List[str]) -> None:
    p = ArgParser(prog="dsq report",
                                description="Comparison table and validation curves of an experiment")
    p.add_argument("--experiment", required=True)
    p.add_argument("--tracking-uri", default="sqlite:///runs/mlflow.db")
    p.add_argument("--out", default=None, help="output folder (default runs/report-EXPERIMENT)")
    ns = p.parse_args(argv)
    from dsq.tracking.report import ReportError, report

    out = ns.out or f"runs/report-{ns.experiment}"
    db = ns.tracking_uri.partition("sqlite:///")[2]
    if ns.tracking_uri.startswith("sqlite:///") and not os.path.isfile(db):  # MLflow would make it
        _fail(f"no MLflow store at {db}: check --tracking-uri (the run's tracking.uri)")
    try:
        md, png, run_id = report(ns.experiment, ns.tracking_uri, out)
    except ReportError as e:
        _fail(str(e))
    print(md.read_text())
    print(f"table: {md}\nplot:  {png}\nlogged to MLflow run {run_id}")


def cmd_ckpt(argv: List[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: dsq ckpt reshard CKPT_DIR --dp N [--tag TAG] [--out DIR]\n\n"
              "Convert a ZeRO checkpoint to another data-parallel size "
              "(dsq ckpt reshard --help for the options).")
        sys.exit(0)
    if not argv or argv[0] != "reshard":
        _fail("usage: dsq ckpt reshard CKPT_DIR --dp N [--tag TAG] [--out DIR]")
    from dsq.runtime import quiet_libraries

    quiet_libraries()
    from dsq.run.reshard import main as reshard_main

    try:
        reshard_main(argv[1:])
    except (FileNotFoundError, ValueError) as e:  # a bad path, a ZeRO-0 or incomplete checkpoint
        _fail(str(e))


COMMANDS = {"ckpt": cmd_ckpt, "train": cmd_train, "prepare": cmd_prepare, "eval": cmd_eval, "config": cmd_config,
            "export": cmd_export, "generate": cmd_generate,
            "mlflow": cmd_mlflow, "report": cmd_report}


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
    if argv and argv[0] == "--version":
        import dsq

        print(f"dsq {dsq.__version__}")
        sys.exit(0)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    cmd = argv[0]
    from dsq.runtime import use_env_extensions_dir

    use_env_extensions_dir()
    if "--verbose" in argv and cmd not in ("train", "prepare", "config"):
        argv.remove("--verbose")
        os.environ["DSQ_LOG_LEVEL"] = "INFO"
    if cmd not in COMMANDS and cmd != "bench":
        _fail(f"unknown command {cmd!r}: give one of {', '.join([*COMMANDS, 'bench'])} "
              f"(dsq --help)")
    try:
        if cmd in ("train", "eval", "bench", "generate", "export"):
            from dsq.runtime import tune_allocator

            tune_allocator()
        if cmd == "bench":
            from dsq.bench import main as bench_main

            return bench_main(argv[1:])
        COMMANDS[cmd](argv[1:])
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints first)
        if int(os.environ.get("RANK", "0")) == 0:
            print("\ndsq: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)


def entry() -> None:
    """The ``dsq`` command (and ``python -m dsq.cli``): :func:`main`, then a quick exit.

    Once the command is done, the objects left (the imported libraries' modules, mostly) are
    frozen, so the interpreter's exit skips its garbage-collection passes over them (a second
    or more per process, paid by every rank of every launch). Files, ``atexit`` handlers and
    child processes are closed as usual; the exit code is :func:`main`'s.
    """
    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    entry()
