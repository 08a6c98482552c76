"""Seal every model file of a Triton-layout model repository in place."""

from __future__ import annotations

import logging
from pathlib import Path

from forseti.core.repository.layout import VERSION_MANIFEST, parse_version_name, warn_not_a_version

from .keyring import Keyring
from .sealed import SEALED_SUFFIX, SealError, seal_file

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
    if problems:
        raise SealRepositoryError(problems, sealed)
    return sealed
