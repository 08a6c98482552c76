"""What one listing of a model's prefix says: its config, its manifest and its version folders.

A poll costs one listing per model (one LIST request on an object store, paged per 1000
objects), plus a read of the config or manifest only when their tags changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from forseti.core.errors import ModelLoadError
from forseti.core.repository.config import CONFIG_FILENAME
from forseti.core.repository.layout import is_hidden, parse_version_name, warn_not_a_version
from forseti.core.repository.manifest import MANIFEST_NAME
from forseti.core.sealing.sealed import SEALED_SUFFIX
from forseti.core.storage import ObjectInfo, Storage

# Object-store publishing: a version's number is claimed with CLAIM_NAME (created only if
# absent), its files are written, and COMMIT_NAME is written last. Without a commit marker
# (plaintext repositories) or a manifest entry (sealed ones) a version does not exist.
CLAIM_NAME = ".forseti-claim"
COMMIT_NAME = ".forseti-commit"


@dataclass(frozen=True)
class VersionListing:
    number: int
    files: dict[str, ObjectInfo]  # every file directly in the version folder, hidden included

    @property
    def committed(self) -> bool:
        return COMMIT_NAME in self.files


@dataclass(frozen=True)
class ModelListing:
    name: str
    config: ObjectInfo | None
    manifest: ObjectInfo | None
    versions: dict[int, VersionListing]

    def state(self) -> tuple[object, ...]:
        """What a poll compares: every tag under the model."""
        return (
            self.config.etag if self.config else None,
            self.manifest.etag if self.manifest else None,
            tuple(
                (v, tuple(sorted((n, i.etag, i.size) for n, i in vl.files.items())))
                for v, vl in sorted(self.versions.items())
            ),
        )


def list_model(storage: Storage, name: str) -> ModelListing:
    """One listing of `<name>/`; folders that are not version numbers are skipped (warned once),
    hidden ones (publishers' temporaries) silently."""
    config = manifest = None
    versions: dict[int, dict[str, ObjectInfo]] = {}
    skipped: set[str] = set()
    for info in storage.list_all(name):
        rest = info.key[len(name) + 1 :]
        if "/" not in rest:
            if rest == CONFIG_FILENAME:
                config = info
            elif rest == MANIFEST_NAME:
                manifest = info
            continue
        folder, _, filename = rest.partition("/")
        if is_hidden(folder) or "/" in filename:
            continue
        number = parse_version_name(folder)
        if number is None:
            if folder not in skipped:
                skipped.add(folder)
                warn_not_a_version(f"{storage.location}/{name}/{folder}")
            continue
        versions.setdefault(number, {})[filename] = info
    return ModelListing(
        name,
        config,
        manifest,
        {v: VersionListing(v, files) for v, files in versions.items()},
    )


def list_model_names(storage: Storage) -> list[str]:
    """Model folders at the repository's root, sorted (hidden ones left out)."""
    return sorted(n for n in storage.list_dir("").folders if not is_hidden(n))


def find_listed_artifact(
    files: dict[str, ObjectInfo], filename: str, allow_plaintext: bool
) -> tuple[ObjectInfo, bool]:
    """The version's `<filename>.sealed` (or the plaintext file, only when allowed) and whether
    it is sealed; ModelLoadError says what is missing."""
    sealed = files.get(filename + SEALED_SUFFIX)
    if sealed is not None:
        return sealed, True
    plain = files.get(filename)
    if plain is not None:
        if allow_plaintext:
            return plain, False
        raise ModelLoadError(
            f"found plaintext '{filename}' but plaintext artifacts are refused; "
            "seal it with `forseti seal` or start the server with --allow-plaintext"
        )
    raise ModelLoadError(f"missing artifact '{filename}{SEALED_SUFFIX}' in version folder")
