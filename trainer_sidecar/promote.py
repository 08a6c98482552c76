"""Promotion: seal, publish as the next version atomically, ask every server replica to load
it, and confirm that each one now answers from the new version.

When a replica does not get there in time the promotion fails, naming it; the policy for the
others is *report partial and retry*: replicas that took the version keep serving it (it passed
the gate, and in poll mode every replica would load it again from the repository anyway), the
error and the audit log say which replicas serve it and which do not, and the next promotion
(or a retry) loads the newest version on every replica, idempotently. No rollback: unloading
a version from healthy replicas would lower what they serve to hide one replica's problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from forseti.core.repository.layout import VERSION_MANIFEST
from forseti.core.repository.publish import publish_model_version
from forseti.core.sealing.keyring import Keyring
from forseti.core.storage import open_storage

from .replicas import Replica

log = logging.getLogger(__name__)

MANIFEST = VERSION_MANIFEST


class PromotionError(Exception):
    """The new version was published but a server did not start serving it in time.

    ``failed`` maps each replica that does not serve it to why; ``served`` lists those that do
    (empty when the promotion failed before any replica was asked)."""

    def __init__(
        self,
        message: str,
        *,
        failed: Mapping[str, str] | None = None,
        served: Sequence[str] = (),
        version: int | None = None,
    ) -> None:
        super().__init__(message)
        self.version = version
        self.failed = dict(failed or {})
        self.served = list(served)


@dataclass(frozen=True)
class Promotion:
    model: str
    version: int
    publish_seconds: float
    # From the rename that made the version visible to the first answer that came from it
    # (on the last replica to get there, when there are several).
    publish_to_serving_seconds: float
    # Each replica's own publish-to-serving time, by address.
    replica_seconds: dict[str, float] = field(default_factory=dict)


def version_manifest(
    artifacts: Mapping[str, bytes], manifest: dict[str, Any], version: int
) -> bytes:
    """The version's manifest.json: where it came from, its number and its artifacts' hashes
    (plain JSON, no secret; committed in the model manifest with the artifacts)."""
    full = dict(manifest)
    full["version"] = version
    full["artifacts"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        for name, data in artifacts.items()
    }
    return (json.dumps(full, indent=2, sort_keys=True, default=str) + "\n").encode()


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


def _confirm_one(
    replica: Replica,
    model: str,
    version: int,
    probe: np.ndarray,
    timeout_s: float,
    headers: dict | None,
    published: float,
) -> tuple[str, float | str]:
    """Load and confirm on one replica: (address, seconds since publish) or (address, why)."""
    try:
        _load(replica.client, model, headers)
        wait_until_serving(
            replica.client, model, version, probe, timeout_s=timeout_s, headers=headers
        )
    except PromotionError as exc:
        return replica.address, str(exc)
    except Exception as exc:  # an unreachable replica must not hide the others' outcome
        return replica.address, f"{type(exc).__name__}: {exc}"
    return replica.address, time.perf_counter() - published


def confirm_on_replicas(
    replicas: Sequence[Replica],
    model: str,
    version: int,
    probe: np.ndarray,
    *,
    timeout_s: float,
    headers: dict | None = None,
    published: float | None = None,
) -> dict[str, float]:
    """Load ``version`` on every replica (explicit mode) or wait for its poll (poll mode), all
    at once, and confirm that each answers from it; returns each replica's seconds from
    ``published`` (perf_counter) to serving. Raises PromotionError naming the replicas that
    did not get there within ``timeout_s`` and those that did."""
    if not replicas:
        raise PromotionError(f"version {version} of {model}: no replicas to promote to")
    start = time.perf_counter() if published is None else published
    with ThreadPoolExecutor(max_workers=max(1, len(replicas))) as pool:
        outcomes = list(
            pool.map(
                lambda r: _confirm_one(r, model, version, probe, timeout_s, headers, start),
                replicas,
            )
        )
    serving = {a: o for a, o in outcomes if isinstance(o, float)}
    failed = {a: o for a, o in outcomes if isinstance(o, str)}
    if failed:
        where = "; ".join(f"{address}: {why}" for address, why in failed.items())
        partial = (
            f"replicas serving it: {', '.join(serving)}; the next promotion loads the newest "
            "version on every replica"
            if serving
            else "no replica serves it"
        )
        raise PromotionError(
            f"version {version} of {model} is not served by {len(failed)} of {len(replicas)} "
            f"replicas ({where}); {partial}",
            failed=failed,
            served=list(serving),
            version=version,
        )
    return serving


def promote(
    client: grpcclient.InferenceServerClient | Sequence[Replica],
    *,
    repository: Path | str,
    model: str,
    config_text: str,
    artifacts: Mapping[str, bytes],
    manifest: dict[str, Any],
    keyring: Keyring,
    probe: np.ndarray,
    timeout_s: float = 60.0,
    headers: dict | None = None,
) -> Promotion:
    """Publish ``artifacts`` as the next version of ``model`` and wait until it serves on
    ``client``'s server, or on every replica of a list (see confirm_on_replicas)."""
    if isinstance(client, grpcclient.InferenceServerClient):
        replicas: Sequence[Replica] = [Replica("server", client)]
    else:
        replicas = client
    start = time.perf_counter()
    # The version's files first, the model manifest last (the commit the servers check); on
    # a folder or an object store (s3://), the same code as `forseti publish`.
    version = publish_model_version(
        open_storage(repository),
        model,
        artifacts,
        keyring=keyring,
        config_text=config_text,
        extra_files=lambda number: {MANIFEST: version_manifest(artifacts, manifest, number)},
    ).version
    published = time.perf_counter()
    each = confirm_on_replicas(
        replicas, model, version, probe, timeout_s=timeout_s, headers=headers, published=published
    )
    promotion = Promotion(
        model=model,
        version=version,
        publish_seconds=published - start,
        publish_to_serving_seconds=max(each.values()),
        replica_seconds=each,
    )
    log.info(
        "promoted",
        extra={
            "model": model,
            "version": version,
            "publish_ms": round(promotion.publish_seconds * 1000, 1),
            "publish_to_serving_ms": round(promotion.publish_to_serving_seconds * 1000, 1),
            "replicas": len(each),
        },
    )
    return promotion
