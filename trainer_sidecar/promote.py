"""Promotion: seal, publish as the next version atomically, ask the server to load it, and
confirm that it now answers from the new version."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from forseti.core.durable import atomic_write
from forseti.core.repository.layout import VERSION_MANIFEST
from forseti.core.repository.publish import publish_version
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import SEALED_SUFFIX, seal_bytes

log = logging.getLogger(__name__)

MANIFEST = VERSION_MANIFEST


class PromotionError(Exception):
    """The new version was published but the server did not start serving it in time."""


@dataclass(frozen=True)
class Promotion:
    model: str
    version: int
    publish_seconds: float
    # From the rename that made the version visible to the first answer that came from it.
    publish_to_serving_seconds: float


def write_config(model_dir: Path, config_text: str) -> bool:
    """Write config.pbtxt atomically when it changed; True if it was written."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    data = config_text.encode()
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write(path, data, mode=0o644)
    return True


def sealed_version_files(
    artifacts: Mapping[str, bytes],
    manifest: dict[str, Any],
    keyring: Keyring,
    model: str,
) -> Callable[[int], dict[str, bytes]]:
    """The publish callback: seals each artifact bound to the version number it is given."""

    def make_files(version: int) -> dict[str, bytes]:
        files = {
            name + SEALED_SUFFIX: seal_bytes(
                data, keyring, model=model, version=version, filename=name
            )
            for name, data in artifacts.items()
        }
        full = dict(manifest)
        full["version"] = version
        full["artifacts"] = {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for name, data in artifacts.items()
        }
        files[MANIFEST] = (json.dumps(full, indent=2, sort_keys=True, default=str) + "\n").encode()
        return files

    return make_files


def _load(client: grpcclient.InferenceServerClient, model: str, headers: dict | None) -> None:
    try:
        client.load_model(model, headers=headers)
    except InferenceServerException as exc:
        # A server in poll mode refuses explicit loads; its poll picks the version up instead.
        if "not allowed" not in (exc.message() or ""):
            raise PromotionError(
                f"the server refused to load {model}: {exc.message()}; the version is "
                "published and will be served at the next load (check server.token_header "
                "and server.token_file if the repository protocol is restricted)"
            ) from None
        log.info("server polls the repository; waiting for it", extra={"model": model})


def wait_until_serving(
    client: grpcclient.InferenceServerClient,
    model: str,
    version: int,
    probe: np.ndarray,
    *,
    timeout_s: float,
    headers: dict | None = None,
) -> None:
    """Block until a version-less call is answered by ``version`` (what clients will get)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            if client.is_model_ready(model, str(version), headers=headers):
                tensor = grpcclient.InferInput("obs", list(probe.shape), "FP32")
                tensor.set_data_from_numpy(probe)
                answered = client.infer(model, [tensor], headers=headers).get_response()
                if answered.model_version == str(version):
                    return
                last = f"answered by version {answered.model_version}"
            else:
                last = "version not ready"
        except InferenceServerException as exc:
            last = exc.message() or str(exc)
        time.sleep(0.02)
    raise PromotionError(
        f"version {version} of {model} was published but not served within {timeout_s:g}s "
        f"({last}); check the server's log and RepositoryIndex"
    )


def promote(
    client: grpcclient.InferenceServerClient,
    *,
    repository: Path,
    model: str,
    config_text: str,
    artifacts: Mapping[str, bytes],
    manifest: dict[str, Any],
    keyring: Keyring,
    probe: np.ndarray,
    timeout_s: float = 60.0,
    headers: dict | None = None,
) -> Promotion:
    """Publish ``artifacts`` as the next version of ``model`` and wait until it serves."""
    model_dir = repository / model
    write_config(model_dir, config_text)
    start = time.perf_counter()
    version = publish_version(model_dir, sealed_version_files(artifacts, manifest, keyring, model))
    published = time.perf_counter()
    _load(client, model, headers)
    wait_until_serving(client, model, version, probe, timeout_s=timeout_s, headers=headers)
    serving = time.perf_counter()
    promotion = Promotion(
        model=model,
        version=version,
        publish_seconds=published - start,
        publish_to_serving_seconds=serving - published,
    )
    log.info(
        "promoted",
        extra={
            "model": model,
            "version": version,
            "publish_ms": round(promotion.publish_seconds * 1000, 1),
            "publish_to_serving_ms": round(promotion.publish_to_serving_seconds * 1000, 1),
        },
    )
    return promotion
