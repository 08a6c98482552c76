"""Which data plane answers the gRPC port: the Python one (grpc.aio) or the native one (the
C++ extension `forseti_native`, built by `make native`), chosen by `--data-plane`."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

log = logging.getLogger(__name__)

DATA_PLANES = ("python", "native", "auto")
DEFAULT_DATA_PLANE = "python"


class DataPlaneError(Exception):
    """The requested data plane cannot run here; the message says why and what to do."""


def native_extension() -> tuple[ModuleType | None, str]:
    """The native extension module, or None and why it cannot be imported."""
    try:
        return importlib.import_module("forseti_native"), ""
    except ImportError as exc:
        return None, str(exc)


def use_native(choice: str) -> bool:
    """Whether `--data-plane choice` runs the native data plane; raises DataPlaneError when
    "native" is asked for and the extension is not built."""
    if choice not in DATA_PLANES:
        raise DataPlaneError(f"--data-plane must be one of {', '.join(DATA_PLANES)}")
    if choice == "python":
        return False
    module, why = native_extension()
    if module is not None:
        log.info("data plane: native", extra={"requested": choice})
        return True
    if choice == "native":
        raise DataPlaneError(
            f"--data-plane native: the native extension is not built ({why}); "
            "build it with `make native` or use --data-plane python"
        )
    log.info("data plane: python (the native extension is not built)", extra={"why": why})
    return False
