"""Reseal a model repository to the keyring's newest key while a server keeps serving from it.

Each sealed file is re-encrypted into a hidden temporary file beside it, fsynced, opened again
to prove it carries the same plaintext, and only then renamed over the original
(``os.replace``, atomic on POSIX). A server that loads during a reseal reads either the old or
the new file; both open while the keyring holds both keys. Format 1 files are resealed in
memory (they are at most 2 GiB); format 2 files are streamed chunk by chunk and keep their
chunk size, so memory stays at about one chunk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from forseti.core.durable import atomic_output
from forseti.core.repository.layout import version_dirs
from forseti.core.repository.manifest import (
    MANIFEST_NAME,
    ManifestError,
    ModelManifest,
    commit_manifest,
)
from forseti.core.storage import open_storage

from .key_rotation import read_header_key
from .keyring import Keyring
from .sealed import (
    FORMAT_V1,
    SEALED_SUFFIX,
    SealError,
    SealingWriter,
    open_sealed,
    open_sealed_stream,
    parse_header,
    plaintext_name,
    seal_bytes,
)

logger = logging.getLogger(__name__)

LOCK_NAME = ".forseti-reseal.lock"


class ResealError(Exception):
    """The reseal could not start (the message says why); files already done stay done."""


@dataclass(frozen=True)
class ResealedFile:
    """One file moved to the newest key. Digests are of the sealed files, as the server and
    the audit log record them; the plaintext is proven unchanged before the rename."""

    model: str
    version: int
    path: Path
    from_key: str
    to_key: str
    old_sha256: str
    new_sha256: str


@dataclass
class ResealReport:
    resealed: list[ResealedFile] = field(default_factory=list)
    pending: list[Path] = field(default_factory=list)  # dry run: what would be resealed
    current: int = 0  # files already sealed with the newest key
    problems: list[str] = field(default_factory=list)
    # model manifests moved to the newest key (dry run: that would be)
    manifests: list[Path] = field(default_factory=list)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _plaintext_sha256(path: Path, keyring: Keyring, model: str, version: int, name: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in open_sealed_stream(fh, keyring, model=model, version=version, filename=name):
            digest.update(piece)
    return digest.hexdigest()


def _write_resealed(
    path: Path, out: BinaryIO, keyring: Keyring, model: str, version: int, name: str
) -> str:
    """Reseal ``path`` into the open file ``out``; returns the plaintext's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        head = src.read(4096)
        header = parse_header(head)
        src.seek(0)
        if header.format_version == FORMAT_V1:
            plain = open_sealed(src.read(), keyring, model=model, version=version, filename=name)
            digest.update(plain)
            out.write(seal_bytes(plain, keyring, model=model, version=version, filename=name))
            return digest.hexdigest()
        with SealingWriter(
            out, keyring, model=model, version=version, filename=name, chunk_size=header.chunk_size
        ) as writer:
            for piece in open_sealed_stream(
                src, keyring, model=model, version=version, filename=name
            ):
                digest.update(piece)
                writer.write(piece)
    return digest.hexdigest()


def reseal_file(path: Path, keyring: Keyring, *, model: str, version: int) -> ResealedFile | None:
    """Move one sealed file to the newest key atomically; None when it already uses it."""
    path = Path(path)
    name = plaintext_name(path)
    from_key, _ = read_header_key(path)
    to_key = keyring.newest.key_id
    if from_key == to_key:
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    old_sha256 = _file_sha256(path)
    resealed: dict[str, str] = {}

    def same_plaintext(tmp: Path) -> None:
        # Never put a file in place that does not give back exactly what the old one held.
        if _plaintext_sha256(tmp, keyring, model, version, name) != resealed["plain"]:
            raise SealError("resealed file does not match the original", str(path))
        resealed["file"] = _file_sha256(tmp)

    with atomic_output(path, mode=mode, verify=same_plaintext) as out:
        resealed["plain"] = _write_resealed(path, out, keyring, model, version, name)
    new_sha256 = resealed["file"]
    return ResealedFile(model, version, path, from_key, to_key, old_sha256, new_sha256)


@contextlib.contextmanager
def _reseal_lock(repo: Path) -> Iterator[None]:
    """One reseal per repository at a time (a hidden file the server never looks at)."""
    fd = os.open(repo / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResealError(f"another reseal of {repo} is running; wait for it") from None
        yield
    finally:
        os.close(fd)


def reseal_repository(
    repo: Path,
    keyring: Keyring,
    *,
    dry_run: bool = False,
    on_file: Callable[[ResealedFile], None] | None = None,
) -> ResealReport:
    """Reseal every sealed file in ``<repo>/<model>/<version>/`` whose key is not the newest.

    Versions are done one at a time, files one at a time, each atomically. Problems (a file
    whose key the keyring lacks, a damaged file) are collected and the rest carries on.
    ``on_file`` is called after each file is in place (progress, audit).
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise ResealError(f"{repo} is not a folder")
    report = ResealReport()
    newest = keyring.newest.key_id
    with _reseal_lock(repo):
        for model_dir in sorted(p for p in repo.iterdir() if _visible_dir(p)):
            versions = sorted(version_dirs(model_dir).items())
            for version, version_dir in versions:
                for path in sorted(version_dir.glob(f"*{SEALED_SUFFIX}")):
                    if path.name.startswith(".") or not path.is_file():
                        continue
                    done = _reseal_one(
                        path, model_dir.name, version, keyring, newest, dry_run, report
                    )
                    if done is not None and on_file is not None:
                        on_file(done)
            _reseal_manifest(repo, model_dir.name, keyring, newest, dry_run, report)
    return report


def _reseal_manifest(
    repo: Path, model: str, keyring: Keyring, newest: str, dry_run: bool, report: ResealReport
) -> None:
    """Re-seal the model manifest to the newest key (same content, next serial), so that the
    old key can be retired; servers accept it as a newer manifest."""
    path = repo / model / MANIFEST_NAME
    try:
        key_id, _ = read_header_key(path)
    except FileNotFoundError:
        return
    except (SealError, OSError) as exc:
        report.problems.append(f"{model}/{MANIFEST_NAME}: {exc}")
        return
    if key_id == newest:
        return
    report.manifests.append(path)
    if dry_run:
        return
    try:
        commit_manifest(
            open_storage(repo),
            model,
            keyring,
            lambda m: _same_manifest(m, model),
        )
    except ManifestError as exc:
        report.problems.append(f"{model}/{MANIFEST_NAME}: {exc}")


def _same_manifest(current: ModelManifest | None, model: str) -> ModelManifest:
    if current is None:
        raise ManifestError(f"the manifest of {model} vanished")
    return current.next("reseal")


def _reseal_one(
    path: Path,
    model: str,
    version: int,
    keyring: Keyring,
    newest: str,
    dry_run: bool,
    report: ResealReport,
) -> ResealedFile | None:
    where = f"{model}/{version}/{path.name}"
    try:
        if dry_run:
            key_id, _ = read_header_key(path)
            if key_id == newest:
                report.current += 1
            else:
                report.pending.append(path)
            return None
        done = reseal_file(path, keyring, model=model, version=version)
    except FileNotFoundError:
        return None  # the version was removed while we worked: nothing left to reseal
    except SealError as exc:
        report.problems.append(f"{where}: {exc}")
        return None
    except OSError as exc:
        report.problems.append(f"{where}: {exc.strerror or exc}")
        return None
    if done is None:
        report.current += 1
        return None
    report.resealed.append(done)
    logger.info(
        "resealed",
        extra={"model": model, "version": version, "file": path.name, "key_id": done.to_key},
    )
    return done


def _visible_dir(path: Path) -> bool:
    return not path.name.startswith(".") and path.is_dir()
