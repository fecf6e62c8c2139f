"""`sar-ray` command line: parse, call library code, print, set the exit code.

Exit codes: 0 ok, 1 the run failed (NaN loss, a crashed worker), 2 bad input (config, data,
paths, unreachable services). Library code raises; only this module prints and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UserError(Exception):
    """Bad input detected by the CLI itself (exit code 2)."""


def _bad_input_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user's input is wrong" (exit 2), imported lazily so that
    `sar-ray --help` does not import torch."""
    from .config import ConfigError

    types: list[type[BaseException]] = [ConfigError, UserError, FileNotFoundError]
    try:
        from .data import DataError, ImageReadError

        types += [DataError, ImageReadError]
    except ImportError:  # pragma: no cover - data package always present once installed
        pass
    try:
        from .tracking import TrackingError

        types.append(TrackingError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from .train import RayConnectionError

        types.append(RayConnectionError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _failed_types() -> tuple[type[BaseException], ...]:
    try:
        from .train import TrainingError

        return (TrainingError,)
    except ImportError:  # pragma: no cover
        return ()


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study YAML, e.g. sweeps/quickstart.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set strategy.unet.mode=lora (repeatable)",
    )


# ------------------------------------------------------------------------------------ trial


def _cmd_trial(args: argparse.Namespace) -> int:
    from . import config, trial

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    cfg = config.load(args.config, overrides).trial()
    result = trial.run_trial(cfg, fresh=args.fresh, progress=not args.quiet, console=console)
    console.print(trial.summary(result))
    return EXIT_OK


def _add_trial(sub) -> None:
    p = sub.add_parser(
        "trial",
        help="run one fine-tuning trial locally (Ray Train)",
        description="Train one strategy on the study's base config, save diffusers-loadable "
        "outputs, generate samples, and log one MLflow run. Rerunning with the same output "
        "folder resumes from its newest checkpoint (use --fresh to start over).",
    )
    _add_config_args(p)
    p.add_argument("--out", help="output folder (default: runs/<name>/<strategy>)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in --out and start over")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_trial)


# ------------------------------------------------------------------------------------ validate


def _cmd_validate(args: argparse.Namespace) -> int:
    from . import config

    study = config.load(args.config, args.overrides)
    cfg = study.trial()
    console.print(f"[green]ok[/green] {args.config}: strategy {cfg.strategy.slug}, model {cfg.model.pretrained}, "
                  f"data {cfg.data.path} @ {cfg.data.resolution} px, {cfg.train.max_steps} steps, "
                  f"{cfg.scaling.num_workers} workers")
    if args.print:
        console.print(config.dump_yaml(study), markup=False)
    return EXIT_OK


def _add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check a study file without running anything",
        description="Load and validate a study YAML (and --set overrides); print the resolved config with --print.",
    )
    _add_config_args(p)
    p.add_argument("--print", action="store_true", help="print the fully resolved config")
    p.set_defaults(func=_cmd_validate)


# ------------------------------------------------------------------------------------ data


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from .data import write_synthetic

    if args.n <= 0 or args.size < 16 or args.looks <= 0:
        raise UserError(f"data synth: need --n > 0, --size >= 16, --looks > 0 (got n={args.n}, size={args.size}, looks={args.looks})")
    path = write_synthetic(args.out, n=args.n, size=args.size, seed=args.seed, looks=args.looks, fmt=args.format)
    console.print(f"wrote {args.n} synthetic SAR scenes ({args.size} px, {args.looks}-look speckle) to {path}")
    return EXIT_OK


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser(
        "synth",
        help="write synthetic SAR scenes (imagefolder + metadata.jsonl)",
        description="Synthetic SAR scenes (water, fields, forest, urban, ships, vehicles) with "
        "L-look Gamma speckle and captions naming their content. Deterministic per seed.",
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, default=500, help="number of scenes (default 500)")
    s.add_argument("--size", type=int, default=256, help="side in pixels (default 256)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--looks", type=int, default=4, help="number of looks L of the speckle (default 4)")
    s.add_argument("--format", choices=["png", "tiff"], default="png", help="16-bit PNG or float32 TIFF amplitude")
    s.set_defaults(func=_cmd_data_synth)


# ------------------------------------------------------------------------------------ evaluate
# (metrics: `sar-ray evaluate` and `sar-ray clip train`)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    raise UserError("sar-ray evaluate is not available yet")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score generated SAR images against real ones")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_clip_train(args: argparse.Namespace) -> int:
    raise UserError("sar-ray clip train is not available yet")


def _add_clip(sub) -> None:
    p = sub.add_parser("clip", help="SAR-CLIP evaluator")
    csub = p.add_subparsers(dest="clip_cmd", required=True)
    t = csub.add_parser("train", help="fine-tune an open_clip model on SAR image-caption pairs")
    t.set_defaults(func=_cmd_clip_train)


# ------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sar-ray",
        description="Find the best way to fine-tune Stable Diffusion / SDXL for SAR images, with Ray and MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"sar-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_trial(sub)
    _add_validate(sub)
    _add_data(sub)
    _add_evaluate(sub)
    _add_clip(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        err_console.print("interrupted; outputs and checkpoints written so far are kept")
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        if os.environ.get("SAR_RAY_DEBUG"):
            raise
        if isinstance(e, _bad_input_types()):
            _print_error("error", str(e))
            return EXIT_BAD_INPUT
        if isinstance(e, _failed_types()):
            _print_error("failed", str(e))
            return EXIT_FAILED
        _print_error("failed", f"{type(e).__name__}: {e} (set SAR_RAY_DEBUG=1 for the traceback)")
        return EXIT_FAILED


def _print_error(kind: str, message: str) -> None:
    # soft_wrap: one logical line per error, whatever the terminal width; markup off so that
    # brackets in paths and messages print as they are.
    err_console.print(f"[red]{kind}:[/red] ", end="")
    err_console.print(message, markup=False, soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
