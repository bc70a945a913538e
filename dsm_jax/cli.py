"""The ``dsm-jax`` command: ``train | sample | evaluate | denoise``, a thin layer over :mod:`dsm_jax.run`.

``dsm-jax train`` with no arguments trains the default run (8 Gaussians in
2-D, a noise-conditional MLP, multi-scale DSM over 10 noise levels) on the
CPU in a few minutes, then samples with annealed Langevin dynamics,
evaluates and writes into ``runs/default`` (the files: :mod:`dsm_jax.run`).

The work directory is the user's data (:mod:`dsm_jax.workdir`): ``train``,
``sample`` and ``evaluate`` hold an exclusive lock on it (``denoise`` too when
its ``--output`` lies inside it), so a second writer is refused with the pid
and host of the first; ``--overwrite`` deletes only the files a run writes,
after every check has passed, and refuses when the directory holds anything
else; with an unchanged training config it resumes instead.

Exit status: 0 success; 1 a non-finite loss or gradient (the message names
the step) or an internal error (shown with its traceback); 2 a user mistake,
printed as one line: a ``UserError``, a ``ValueError`` raised while the
command validates its inputs (before it changes anything), or an ``OSError``
naming the path it could not read or write (read-only, full disk, not a
directory); 130 on Ctrl-C (SIGINT) and 143 on SIGTERM, after one line saying
what was kept. During training the current step is checkpointed first; during
sampling the process ends at once, and as every file is written atomically
(temporary file, then rename) each is either complete or absent.
``--debug`` (or ``DSM_JAX_DEBUG=1``) shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from dsm_jax import config as config_lib
from dsm_jax import run as run_lib
from dsm_jax.config import Config
from dsm_jax.errors import Interrupted, UserError, os_error_line, signal_name, storage_error_line
from dsm_jax.interrupt import raise_on_sigterm
from dsm_jax.run import Run, build_run, draw_samples, evaluate, fit_to_data, load_trained

__all__ = ["Run", "UserError", "build_run", "draw_samples", "evaluate", "fit_to_data", "load_trained", "main"]

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 1


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage block), exit status 2 as usual."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, what: str):
    """An argparse ``type=`` for integers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _label_list(text: str) -> tuple:
    """``"0,1,2"`` -> ``(0, 1, 2)``: the argparse ``type=`` of ``--labels``."""
    try:
        labels = tuple(int(v) for v in text.split(","))
    except ValueError:
        labels = ()
    if not labels or min(labels) < 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 0 such as 0,1,2, got {text!r}")
    return labels


def _non_negative_float(text: str) -> float:
    """A finite float >= 0: the argparse ``type=`` of ``--guidance``."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0.0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    samplers = list(run_lib.SAMPLERS)
    parser = _Parser(
        prog="dsm-jax", description="Score-based generative modelling with denoising score matching (JAX)."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize() first (arguments detected on TPU pods, "
        "Slurm and Open MPI, or given below)",
    )
    parser.add_argument("--coordinator-address", dest="coordinator_address", help="host:port of process 0")
    parser.add_argument("--num-processes", dest="num_processes", type=int)
    parser.add_argument("--process-id", dest="process_id", type=int)
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,evaluate,denoise}")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train (or resume) a score model, then sample and evaluate",
        description="Train a noise-conditional score model with multi-scale DSM, then sample, "
        "evaluate and plot. Re-running on the same --workdir resumes. Every config field can be "
        "set with --set key=value or a --config file; --list-keys lists them. Unless set, the "
        "model is chosen by the data's shape: images [N, H, W, C] get the U-Net, vectors the MLP.",
    )
    t.add_argument(
        "--preset", default="default", help=f"named config: {', '.join(config_lib.PRESETS)} (default: default)"
    )
    t.add_argument("--dataset", help="a built-in dataset or a path to a .npy/.npz array [N, ...]")
    t.add_argument(
        "--workdir",
        help="run directory (default: runs/<preset> for the preset's dataset, runs/<preset>-<dataset> for another)",
    )
    t.add_argument("--num-steps", type=_non_negative_int, dest="num_steps", help="training steps")
    t.add_argument("--seed", type=_non_negative_int, help="run seed")
    t.add_argument("--sampler", choices=samplers, help="sampler for the final samples")
    t.add_argument(
        "--config",
        metavar="FILE",
        help="JSON config fields, applied after --preset and before --set: a run's config.json "
        '(reproduces it) or {"key": value, ...}',
    )
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override a config field (repeatable), e.g. --set learning_rate=3e-4; --list-keys lists them",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="if the run in --workdir has another training config, delete its files (only those "
        "a run writes; refused if the directory holds others); with the same config, resume",
    )
    t.add_argument("--no-sample", action="store_true", dest="no_sample", help="train only")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--list", action="store_true", help="list presets and datasets, then exit")
    t.add_argument(
        "--list-keys",
        action="store_true",
        dest="list_keys",
        help="list every config key with its type, default and meaning, then exit",
    )

    sample_help = "draw samples from a trained run into samples_<sampler>_n<num>_seed<seed>.*"
    evaluate_help = (
        "sample and evaluate a trained run: with its own sampler, --num and --seed recompute metrics.json, "
        "with others write eval_<sampler>_n<num>_seed<seed>.*"
    )
    for name, help_ in (("sample", sample_help), ("evaluate", evaluate_help)):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--workdir", required=True)
        p.add_argument("--num", type=_positive_int, help="number of samples (default: the run's num_samples)")
        p.add_argument("--sampler", choices=samplers, help=run_lib.describe_samplers())
        p.add_argument("--seed", type=_non_negative_int, help="sampling seed (default: the run's seed)")
        p.add_argument(
            "--steps",
            type=_positive_int,
            help="noise levels of the euler, heun and dpmpp samplers: N evaluations, heun 2 N - 1 "
            "(default: the run's grid_steps)",
        )
        p.add_argument(
            "--labels",
            type=_label_list,
            help="conditional runs: classes to sample, e.g. 0,1,2, cycled over the samples (default: unconditional)",
        )
        p.add_argument(
            "--guidance",
            type=_non_negative_float,
            help="classifier-free guidance weight w >= 0 with --labels: (1 + w) s(x | y) - w s(x) (default 0)",
        )
        if name == "evaluate":
            p.add_argument("--fid-weights", dest="fid_weights", help="FID Inception weights .npz (with --fid-ref)")
            p.add_argument(
                "--fid-ref", dest="fid_ref", help="FID reference statistics .npz (python -m dsm_jax.inception)"
            )
            p.add_argument(
                "--fid-force", action="store_true", dest="fid_force", help="compute the FID of fewer than 2048 images"
            )

    d = sub.add_parser(
        "denoise",
        help="Tweedie-denoise noisy arrays with a trained run",
        description="E[x | y] = y + sigma^2 s(y, sigma) for y = x + sigma * noise.",
    )
    d.add_argument("--workdir", required=True)
    d.add_argument("--input", required=True, help=".npy/.npz float array [N, *D] (or one image [H, W, C])")
    d.add_argument("--sigma", type=float, required=True, help="noise standard deviation of the input")
    d.add_argument("--output", required=True, help=".npy path to write")
    return parser


def _config_sources(args) -> tuple:
    """``(fields of --config, {field: text} of --set and the --dataset/--num-steps/--seed/--sampler flags)``."""
    file_fields = config_lib.read_config_file(args.config) if args.config else {}
    overrides = config_lib.parse_assignments(args.set)
    overrides.update(
        {
            flag: str(getattr(args, flag))
            for flag in ("dataset", "num_steps", "seed", "sampler")
            if getattr(args, flag) is not None
        }
    )
    return file_fields, overrides


def resolve_config(args) -> Config:
    """The preset, then the fields of ``--config FILE``, then the flags and ``--set`` (the last one wins)."""
    file_fields, overrides = _config_sources(args)
    return config_lib.resolve(args.preset, file_fields=file_fields, overrides=overrides, source=args.config)


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def _phase_setter(args):
    return lambda phase: setattr(args, "phase", phase)


def cmd_train(args) -> int:
    if args.list or args.list_keys:
        print(config_lib.presets_listing() if args.list else config_lib.keys_listing())
        return 0
    file_fields, overrides = _config_sources(args)
    cfg = config_lib.resolve(args.preset, file_fields=file_fields, overrides=overrides, source=args.config)
    run_lib.train_and_sample(
        cfg,
        Path(args.workdir) if args.workdir else run_lib.default_workdir(args.preset, cfg),
        user_set=frozenset(file_fields) | frozenset(overrides),
        overwrite=args.overwrite,
        sample=not args.no_sample,
        quiet=args.quiet,
        on_phase=_phase_setter(args),
    )
    return 0


def cmd_sample(args) -> int:
    run_lib.sample_workdir(
        args.workdir,
        evaluate=args.command == "evaluate",
        sampler=args.sampler,
        num=args.num,
        seed=args.seed,
        steps=args.steps,
        on_phase=_phase_setter(args),
        fid_weights=getattr(args, "fid_weights", None),
        fid_ref=getattr(args, "fid_ref", None),
        fid_force=getattr(args, "fid_force", False),
        labels=args.labels,
        guidance=args.guidance,
    )
    return 0


def cmd_denoise(args) -> int:
    run_lib.denoise_file(args.workdir, args.input, args.sigma, args.output, on_phase=_phase_setter(args))
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_sample, "denoise": cmd_denoise}


# ---------------------------------------------------------------------------
# Errors and exit status
# ---------------------------------------------------------------------------


def _failure(err: Exception, phase: str) -> tuple | None:
    """``(kind, line, exit status)`` of an error the user is told in one line; None for a bug (its traceback)."""
    if isinstance(err, ValueError):
        storage = storage_error_line(err)
        if storage is not None:
            return "error", storage, EXIT_USER_ERROR
        if isinstance(err, UserError) or phase == run_lib.CHECKING:
            return "error", str(err).splitlines()[0] if str(err) else type(err).__name__, EXIT_USER_ERROR
        return None
    if isinstance(err, OSError):
        return "error", os_error_line(err), EXIT_USER_ERROR
    from dsm_jax.train import NonFiniteError  # only a command that trained can raise it (train loads flax)

    if isinstance(err, NonFiniteError):
        return "training stopped", str(err), EXIT_NONFINITE
    return None


def _interrupt_line(phase: str, err: KeyboardInterrupt) -> tuple:
    """``(line, exit status)`` for a signal that ended the command outside the sections that report it."""
    if isinstance(err, Interrupted):
        return err.line, 128 + err.signum
    signum = getattr(err, "signum", signal.SIGINT)
    return f"interrupted ({signal_name(signum)}) {run_lib.INTERRUPTED_WHILE[phase]}.", 128 + signum


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (the rule is in the module docstring)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv) or ["--help"])
    args.phase = run_lib.CHECKING
    debug = args.debug or os.environ.get("DSM_JAX_DEBUG", "") not in ("", "0")
    try:
        with raise_on_sigterm(), run_lib.quiet_library_errors(enabled=not debug):
            if args.distributed:
                jax.distributed.initialize(
                    coordinator_address=args.coordinator_address,
                    num_processes=args.num_processes,
                    process_id=args.process_id,
                )
            return COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader went away (``dsm-jax train --list-keys | head``): nothing left to say to it.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as err:
        line, status = _interrupt_line(args.phase, err)
        print(f"dsm-jax {args.command}: {line}", file=sys.stderr)
        return status
    except Exception as err:
        failure = None if debug else _failure(err, args.phase)
        if failure is None:
            raise
        kind, line, status = failure
        print(f"dsm-jax {args.command}: {kind}: {line}", file=sys.stderr)
        return status
