"""Seal every model file of a Triton-layout model repository in place, and write each model's
manifest: the sealed record of its config and committed versions that the server checks."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

from forseti.core.repository.config import CONFIG_FILENAME
from forseti.core.repository.layout import VERSION_MANIFEST, parse_version_name, warn_not_a_version
from forseti.core.repository.listing import list_model, list_model_names
from forseti.core.repository.manifest import (
    ManifestError,
    ModelManifest,
    commit_manifest,
    new_manifest,
    sha256_hex,
)
from forseti.core.storage import Storage, open_storage

from .keyring import Keyring
from .sealed import SEALED_SUFFIX, SealError, open_sealed, seal_file

logger = logging.getLogger(__name__)


class SealRepositoryError(SealError):
    """Some files could not be sealed; the rest were. ``problems`` says which and why."""

    def __init__(self, problems: list[str], sealed: list[Path]) -> None:
        self.problems = problems
        self.sealed = sealed
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            "could not seal every file",
            f"{len(problems)} problem(s), {len(sealed)} file(s) sealed:\n{listing}",
        )


def _visible(path: Path) -> bool:
    # Hidden entries include publishers' in-progress temp folders; never touch them.
    return not path.name.startswith(".")


def seal_repository(repo: Path, keyring: Keyring) -> list[Path]:
    """Seal all plaintext files in ``<repo>/<model>/<int version>/`` and remove the plaintext.

    Files at the model level (config.pbtxt, labels) stay as they are. Everything that can be
    sealed is sealed; if anything could not be, SealRepositoryError lists it afterwards.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise SealError("not a model repository", f"{repo} is not a directory")
    sealed: list[Path] = []
    problems: list[str] = []
    for model_dir in sorted(p for p in repo.iterdir() if _visible(p) and p.is_dir()):
        model = model_dir.name
        for version_dir in sorted(model_dir.iterdir()):
            if not (_visible(version_dir) and version_dir.is_dir()):
                continue
            version = parse_version_name(version_dir.name)
            if version is None:
                warn_not_a_version(version_dir)
                continue
            for entry in sorted(version_dir.iterdir()):
                if (
                    not _visible(entry)
                    or entry.name.endswith(SEALED_SUFFIX)
                    or entry.name == VERSION_MANIFEST
                ):
                    continue
                where = f"{model}/{version_dir.name}/{entry.name}"
                if entry.is_symlink():
                    # Sealing through a link would leave the target's plaintext in place.
                    problems.append(f"{where}: is a symlink; copy the real file in, then seal")
                    continue
                if entry.is_dir():
                    problems.append(f"{where}: nested folders are not sealed; its files stay plain")
                    continue
                if not entry.is_file():
                    problems.append(f"{where}: not a regular file")
                    continue
                try:
                    out = seal_file(entry, keyring, model=model, version=version)
                except (SealError, OSError) as exc:
                    problems.append(f"{where}: {exc}")
                    continue
                logger.info(
                    "sealed model=%s version=%d file=%s key=%s",
                    model,
                    version,
                    entry.name,
                    keyring.newest.key_id,
                )
                sealed.append(out)
    troubled = {p.split("/", 1)[0] for p in problems}
    for model in list_model_names(open_storage(repo)):
        if model in troubled:
            # Its problems are listed already; a manifest would commit a state the operator
            # has not fixed yet. The next `forseti seal` writes it.
            logger.warning("model manifest of %s not written: fix its problems, then re-run", model)
            continue
        try:
            write_model_manifest(open_storage(repo), model, keyring, reason="seal")
        except (ManifestError, SealError, OSError) as exc:
            problems.append(f"{model}: manifest not written: {exc}")
    if problems:
        raise SealRepositoryError(problems, sealed)
    return sealed


def _version_hashes(
    storage: Storage, model: str, version: int, names: list[str], keyring: Keyring
) -> dict[str, str]:
    """{plaintext name: sha256 of the plaintext} of a version's files (sealed ones opened)."""
    hashes: dict[str, str] = {}
    for name in names:
        blob = storage.read(f"{model}/{version}/{name}")
        if name.endswith(SEALED_SUFFIX):
            plain_name = name[: -len(SEALED_SUFFIX)]
            plain = open_sealed(blob, keyring, model=model, version=version, filename=plain_name)
            hashes[plain_name] = hashlib.sha256(plain).hexdigest()
        else:
            hashes[name] = hashlib.sha256(blob).hexdigest()
    return hashes


def write_model_manifest(
    storage: Storage, model: str, keyring: Keyring, reason: str = "seal"
) -> ModelManifest:
    """Authenticate what the repository holds for `model` now: its config.pbtxt and every
    version folder (committed ones on an object store), each sealed file opened to hash its
    plaintext. An existing manifest's serial goes up by one and its pin is kept."""
    listing = list_model(storage, model)
    if listing.config is None:
        raise ManifestError(f"no {CONFIG_FILENAME}")
    config_sha = sha256_hex(storage.read(f"{model}/{CONFIG_FILENAME}"))
    remote = storage.local_root() is None
    versions: dict[int, dict[str, str]] = {}
    for number, vl in sorted(listing.versions.items()):
        if remote and not vl.committed:
            continue
        names = sorted(n for n in vl.files if not n.startswith("."))
        try:
            versions[number] = _version_hashes(storage, model, number, names, keyring)
        except SealError as exc:
            raise ManifestError(f"version {number}: {exc}") from None

    def change(current: ModelManifest | None) -> ModelManifest:
        if current is None:
            return replace(new_manifest(model, config_sha, reason), versions=versions)
        pin = current.pin
        if pin is not None and not set(pin) <= set(versions):
            pin = None  # a pinned version is gone: the pin cannot hold
        return current.next(reason, config_sha256=config_sha, versions=versions, pin=pin)

    return commit_manifest(storage, model, keyring, change)
