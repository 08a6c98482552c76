"""`forseti train`: train a policy from a spec, checkpoint it, and promote it into the server."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from forseti.core.logs import configure_logging

if TYPE_CHECKING:  # imported when a command runs, so `forseti --help` stays light
    from forseti.core.audit import AuditLog

    from .spec import TrainingSpec

log = logging.getLogger(__name__)

EPILOG = """\
The spec is a TOML file; see examples/cartpole_ppo.toml. Exit status: 0 when the run finished
(or stopped cleanly on SIGTERM), 1 on a bad spec, keyring, checkpoint or failed parity check.
"""


def main_train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="forseti train",
        description=(
            "Train a policy with stable-baselines3 on a gymnasium env, checkpoint it (sealed "
            "safetensors), export it to ONNX with a parity check, and promote it into the live "
            "server only if it beats the live version on fixed-seed evaluation episodes."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", type=Path, help="training spec (TOML)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest valid checkpoint"
    )
    p.add_argument(
        "--continuous",
        action="store_true",
        help="sidecar mode: export, gate and promote every sidecar.promote_every_timesteps "
        "until stopped (SIGTERM checkpoints and exits) or the total is reached",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")
    args = p.parse_args(argv)
    configure_logging(args.log_level)

    from .spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"forseti train: {exc}", file=sys.stderr)
        return 1
    return _run(spec, args)


def _run(spec: TrainingSpec, args: argparse.Namespace) -> int:
    from forseti.core.sealing.keyring import KeyringError, load_keyring
    from forseti.exporters.errors import ExportError

    from .checkpoint_format import CheckpointError
    from .gate import GateError
    from .promote import PromotionError
    from .run import TrainingError, TrainingRun
    from .training_metrics import SidecarMetrics, start_metrics_server

    try:
        keyring = load_keyring(spec.server.keyring)
    except KeyringError as exc:
        print(f"forseti train: server.keyring: {exc}", file=sys.stderr)
        return 1
    metrics = SidecarMetrics()
    endpoint = None
    if spec.server.metrics_port is not None:
        address = spec.server.metrics_address
        endpoint, port = start_metrics_server(metrics, address, spec.server.metrics_port)
        print(f"training metrics on http://{address}:{port}/metrics", file=sys.stderr)
    run = TrainingRun(
        spec,
        keyring=keyring,
        resume=args.resume,
        continuous=args.continuous,
        metrics=metrics,
        progress=False if args.no_progress else None,
        audit=_open_audit(spec),
    )
    try:
        result = run.run()
    except (TrainingError, CheckpointError, ExportError, GateError, PromotionError) as exc:
        print(f"forseti train: {exc}", file=sys.stderr)
        return 1
    finally:
        if endpoint is not None:
            endpoint.stop()
        if run.audit is not None:
            run.audit.close()
    promoted = ", ".join(f"v{p.version}" for p in result.promotions) or "none"
    print(
        f"run {spec.run_name}: {result.num_timesteps} timesteps, {result.checkpoints} "
        f"checkpoints, promoted: {promoted}" + (" (stopped)" if result.stopped else "")
    )
    return 0


def _open_audit(spec: TrainingSpec) -> AuditLog | None:
    if spec.server.audit_log is None:
        return None
    from forseti.core.audit import AuditLog

    return AuditLog.open(spec.server.audit_log, component="trainer")
