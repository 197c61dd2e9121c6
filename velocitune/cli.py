"""The `velocitune` command line: one subcommand per pipeline stage (docs/design.md §2, §5).

Training-style commands take a YAML config plus dotted overrides (`--train.steps=200`). Errors the user
can fix (VelocituneError) print one clear message and exit with status 2, without a traceback. A training run
stopped by SIGTERM/SIGUSR1 exits with status 75 (errors.PREEMPTED_EXIT) after its checkpoint.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence

from velocitune import __version__
from velocitune.errors import PREEMPTED_EXIT, Preempted, VelocituneError

CONFIG_HELP = (
    "A YAML config (sections run, data, model, train, mixing, eval, log, checkpoint, dist, prepare, targets, plan: "
    "one file for the whole pipeline, only the keys you change) followed by "
    "dotted overrides such as --train.steps=200 --mixing.rule=dbl. `velocitune train --help-config` "
    "lists every key with its default."
)


def _config_command(sub, name: str, help: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description + "\n\n" + CONFIG_HELP, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file (optional: defaults + overrides also work)")
    p.add_argument("--help-config", action="store_true", help="print every config key with its default and exit")
    return p


def _config_args(args: argparse.Namespace, extra: list[str]) -> tuple[str | None, list[str]]:
    """(config file, dotted overrides) of a config command; --help-config prints every key and exits."""
    from velocitune.config import help_text

    if getattr(args, "help_config", False):
        print(help_text())
        sys.exit(0)
    config = args.config
    if config is not None and config.startswith("--"):  # no file: what argparse took for it is an override
        extra, config = [config] + extra, None
    bad = [e for e in extra if not (e.startswith("--") and "=" in e and "." in e.split("=", 1)[0])]
    if bad:
        raise VelocituneError(
            f"unrecognised argument(s) {' '.join(bad)}; config overrides look like --section.key=value"
        )
    return config, extra


def _split_config(args: argparse.Namespace, extra: list[str]):
    """The config of a command from its file and dotted overrides."""
    from velocitune.config import load_config

    return load_config(*_config_args(args, extra))


def _run_train(args, extra) -> int:
    from velocitune.train import train

    cfg = _split_config(args, extra)
    # The report's plots go to W&B at the end of a logged run; the Trainer itself never imports the report.
    on_end = None
    if cfg.log.wandb:
        from velocitune.report.plots import upload_plots  # matplotlib: only when W&B takes the plots

        on_end = upload_plots
    train(cfg, resume=args.resume, dry_run=args.dry_run, on_end=on_end)
    return 0


def _run_prepare(args, extra) -> int:
    from velocitune.prepare.command import main

    args.config, overrides = _config_args(args, extra)
    return main(args, overrides)


def _run_init_loss(args, extra) -> int:
    from velocitune.targets import init_loss_main

    return init_loss_main(_split_config(args, extra), out=args.out)


# `velocitune targets` flags and the config keys they set (a flag wins over the file and the overrides).
_TARGET_FLAGS = {"fraction": "targets.fraction", "points": "targets.points", "predictor": "targets.predictor",
                 "proxy_schedule": "targets.proxy_schedule"}


def _run_targets(args, extra) -> int:
    from velocitune.targets import targets_main

    flags = [f"--{key}={getattr(args, name)}" for name, key in _TARGET_FLAGS.items() if getattr(args, name) is not None]
    return targets_main(_split_config(args, extra + flags), out=args.out)


def _run_plan(args, extra) -> int:
    from velocitune.plan import main

    config, overrides = _config_args(args, extra)
    return main(args, overrides, config)


def _delegate(module: str) -> tuple[Callable, Callable]:
    """(add_arguments, main) of a module that owns its own argument parsing."""
    import importlib

    mod = importlib.import_module(f"velocitune.{module}")
    return mod.add_arguments, mod.main


def _add_delegated(sub, name: str, module: str, help: str, handler: Callable | None = None) -> None:
    """A subcommand whose module owns its arguments (`add_arguments`, `main`); with `handler`, it takes dotted
    config overrides too and the handler passes them on."""
    add_arguments, main = _delegate(module)
    p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    add_arguments(p)  # may set its own description, epilog and formatter
    p.set_defaults(handler=handler or (lambda a, extra, main=main: main(a)), takes_overrides=handler is not None)


def _run_sweep(args, extra) -> int:
    from velocitune.sweep import main

    # Dotted overrides after the config apply to every arm, like --set (checked the same way as train's).
    _, overrides = _config_args(argparse.Namespace(config=None), extra)
    args.set = list(args.set) + overrides
    return main(args)


def _add_prepare(sub) -> None:
    from velocitune.prepare import command as prepare_command

    p = _config_command(sub, "prepare", "tokenize corpora into token shards with fixed validation sets",
                        prepare_command.DESCRIPTION.rstrip(), prepare_command.EPILOG)
    prepare_command.add_arguments(p)
    p.set_defaults(handler=_run_prepare, takes_overrides=True)


def _add_init_loss(sub) -> None:
    p = _config_command(sub, "init-loss", "the base model's per-domain validation loss (l_init)",
                        "Measure the base model's per-domain validation loss and write init_loss.json.")
    p.add_argument("--out", help="where to write init_loss.json (default: mixing.init_loss, else RUN.out_dir/init_loss.json)")
    p.set_defaults(handler=_run_init_loss, takes_overrides=True)


def _add_targets(sub) -> None:
    p = _config_command(sub, "targets", "predict per-domain target losses from a proxy run",
                        "Run a short proxy on a stratified subsample with static w0, fit a scaling law per "
                        "domain and write targets.json (+ targets.png).")
    p.add_argument("--out", help="where to write targets.json (default: mixing.targets, else RUN.out_dir/targets.json); "
                                 "init_loss.json goes to mixing.init_loss, else beside it")
    p.add_argument("--fraction", type=float, default=None, help="proxy subsample fraction p (targets.fraction, default 0.2)")
    p.add_argument("--points", type=int, default=None, help="evaluation points n_ckpt (targets.points, default 20)")
    p.add_argument("--predictor", choices=["chinchilla", "cpt_law", "auto"], default=None,
                   help="cpt_law (default): LR-aware CPT law; chinchilla: L(D)=E+B/D^beta (the paper); "
                        "auto: chinchilla, and cpt_law where its checks fail")
    p.add_argument("--proxy-schedule", choices=["compressed", "constant"], default=None,
                   help="compressed (default): the main LR schedule squeezed to the proxy's length, anneal "
                        "included; constant: peak LR without anneal (the paper's proxy)")
    p.set_defaults(handler=_run_targets, takes_overrides=True)


def _add_plan(sub) -> None:
    p = _config_command(sub, "plan", "predict any mixture's per-domain loss from a few proxies; recommend one",
                        "Run short proxies at k + 2 mixtures (w0, uniform, a tilt toward each domain), fit a "
                        "mixture law per domain (Ye et al.'s mixing law or the D-CPT share law, chosen by "
                        "leave-one-mixture-out error) and recommend the mixture that minimises the objective. "
                        "Writes plan.json and plan.png; `velocitune train --mixing.plan=DIR/plan.json` uses it.",
                        "Costs plan.budget (default 0.5) of the main run's training steps, printed before it starts. "
                        "Finished proxies are reused: re-running after a failure runs only the missing ones.")
    add_plan_arguments, _ = _delegate("plan")
    add_plan_arguments(p)
    p.set_defaults(handler=_run_plan, takes_overrides=True)


def _add_train(sub) -> None:
    p = _config_command(sub, "train", "continual pre-training with a mixing rule",
                        "Continue pre-training a model on prepared domains, re-weighting them while it trains.")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in run.out_dir")
    p.add_argument("--dry-run", action="store_true",
                   help="check config, data, model and targets; print the budget, memory and overhead estimates; "
                        "exit without training or writing anything")
    p.set_defaults(handler=_run_train, takes_overrides=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="velocitune",
        description="Continual pre-training on a mixture of domains, re-weighted by learning velocity.",
        epilog="The commands are listed in pipeline order; `velocitune COMMAND --help` describes each.",
    )
    parser.add_argument("--version", action="version", version=f"velocitune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Pipeline order (the order --help lists them in): data, targets, training, evaluation, comparison.
    _add_prepare(sub)
    _add_init_loss(sub)
    _add_targets(sub)
    _add_plan(sub)
    _add_train(sub)
    _add_delegated(sub, "eval", "downstream", "downstream scores of finished runs with lm-evaluation-harness, offline")
    _add_delegated(sub, "report", "report", "tables and plots comparing run directories")
    _add_delegated(sub, "sweep", "sweep", "a grid of training runs over seeds, as parallel resumable processes",
                   handler=_run_sweep)
    _add_delegated(sub, "demo", "demo", "the whole pipeline on the embedded demo corpus, on a CPU")
    return parser


# Packages a command may need that a lean environment (the bare GPU image of docs/scaling.md) can lack, with how
# to get each; a ModuleNotFoundError for one of them is a one-line error, not a traceback.
_INSTALL_HINTS = {
    "matplotlib": "pip install matplotlib (a dependency of velocitune, used for the plots of report, targets "
                  "and plan; training needs it only for W&B's images)",
    "zstandard": "pip install 'velocitune[formats]' (for .zst inputs)",
    "psutil": "pip install psutil (the memory check of CPU runs; or set train.memory_check=false)",
    "yaml": "pip install pyyaml (a dependency of velocitune)",
    "tqdm": "pip install tqdm (a dependency of velocitune)",
}


def _prints_errors() -> bool:
    """Whether this process prints the `error:` line: always outside torchrun; under torchrun (RANK set) only
    rank 0, since every rank meets the same config and data checks and would print the same line;
    VELOCITUNE_ERRORS=all_ranks makes every rank print (for an error only one rank meets)."""
    import os

    return os.environ.get("RANK", "0") == "0" or os.environ.get("VELOCITUNE_ERRORS") == "all_ranks"


def _error(message: str) -> None:
    if _prints_errors():
        print(f"error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        return int(args.handler(args, extra) or 0)
    except Preempted:
        # Training already said where it stopped and how to continue; the status lets a job script requeue.
        return PREEMPTED_EXIT
    except VelocituneError as e:
        _error(str(e))
        return 2
    except ModuleNotFoundError as e:
        package = (e.name or "").split(".")[0]
        if package not in _INSTALL_HINTS:
            raise
        _error(f"this command needs the `{package}` package, which is not installed: {_INSTALL_HINTS[package]}")
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Checkpoint writes say which checkpoint survived (CheckpointError); any other write lands here.
        _error(f"the disk is full ({e}); free some space, then continue the run with --resume")
        return 2
    except KeyboardInterrupt:
        if _prints_errors():
            print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
