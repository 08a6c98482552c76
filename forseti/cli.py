"""The `forseti` command: dispatches to each part's subcommands, importing a part only when
its command runs (so `forseti serve` never imports torch)."""

from __future__ import annotations

import importlib
import sys

import forseti

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": (
        "forseti.server.cli",
        "main_serve",
        "serve a model repository over Triton's gRPC protocol",
    ),
    "keys": ("forseti.core.cli", "main_keys", "create, rotate, list and retire keyring keys"),
    "seal": ("forseti.core.cli", "main_seal", "seal every plaintext model file of a repository"),
    "reseal": (
        "forseti.core.cli",
        "main_reseal",
        "re-encrypt a repository's artifacts to the newest key, atomically, while serving",
    ),
    "audit": ("forseti.core.cli", "main_audit", "verify a hash-chained audit log"),
    "publish": (
        "forseti.core.cli",
        "main_publish",
        "seal model files and publish them as a model's next version (folder or s3://)",
    ),
    "rollback": (
        "forseti.core.cli",
        "main_rollback",
        "serve an earlier committed version of a model (a new, pinned model manifest)",
    ),
    "train": (
        "forseti.trainer_sidecar.cli",
        "main_train",
        "train a policy, checkpoint it, and promote it into the live server if it is better",
    ),
    "export": (
        "forseti.trainer_sidecar.export_cli",
        "main_export",
        "export a checkpoint as an ONNX/safetensors/GGUF policy, or a safetensors file as GGUF",
    ),
    "loadtest": (
        "forseti.loadtests.runner",
        "main",
        "run a bounded locust load test against a server",
    ),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: forseti COMMAND [options]",
        "",
        "Forseti: a Triton-compatible inference and policy server with a training sidecar.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()),
        "",
        "Run `forseti COMMAND --help` for a command's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `forseti` console script."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        print(f"forseti {forseti.__version__}")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"forseti: unknown command '{args[0]}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function, _ = command
    module = importlib.import_module(module_name)
    return int(getattr(module, function)(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
