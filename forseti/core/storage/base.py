"""The storage interface and the choice of implementation from a location string."""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from pathlib import Path

# Schemes served by the object-store implementation (obstore gives gs:// and az:// with the
# same client; s3:// is the one tested against a real S3 protocol).
REMOTE_SCHEMES = ("s3://", "gs://", "az://", "abfs://", "abfss://")


class StorageError(Exception):
    """A storage operation failed. The message names the key, never a credential."""


class StorageNotFound(StorageError):
    """The object does not exist."""


class ConflictError(StorageError):
    """A conditional write lost: the object exists (create) or changed (replace)."""


class TooLarge(StorageError):
    """An object is larger than the reader's limit (refused before it is read whole)."""

    def __init__(self, key: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"{key} is {size} bytes, over the limit of {limit}")


class StorageUnavailable(StorageError):
    """The store could not be reached or answered with an error (timeouts included)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its key, size and an opaque tag that changes whenever its bytes change."""

    key: str
    size: int
    etag: str


@dataclass(frozen=True)
class Listing:
    """One level of a prefix: the sub-prefixes ("folders") and the objects directly in it."""

    folders: list[str] = field(default_factory=list)
    objects: dict[str, ObjectInfo] = field(default_factory=dict)  # name -> info


class Storage(abc.ABC):
    """A repository's bytes. Keys are relative, "/"-separated, never start with "/"."""

    location: str  # for messages and logs: the folder or URL (without credentials)

    @abc.abstractmethod
    def list_dir(self, prefix: str) -> Listing:
        """The folders and objects directly under `prefix` ("" for the root)."""

    @abc.abstractmethod
    def list_all(self, prefix: str) -> list[ObjectInfo]:
        """Every object under `prefix`, at any depth (one listing, paged by the store)."""

    @abc.abstractmethod
    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        """The whole object. When `max_bytes` is given, an object larger than it raises
        StorageError before (or without) reading it all."""

    @abc.abstractmethod
    def read_object(self, key: str, max_bytes: int | None = None) -> tuple[bytes, ObjectInfo]:
        """The whole object and the tag of exactly those bytes (what a conditional replace
        of it must name)."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """The object's info, or None when it does not exist."""

    @abc.abstractmethod
    def write(self, key: str, data: bytes) -> ObjectInfo:
        """Write the object whole (readers see the old or the new bytes, never a mix)."""

    @abc.abstractmethod
    def create(self, key: str, data: bytes) -> ObjectInfo:
        """Write the object only if it does not exist; ConflictError if it does."""

    @abc.abstractmethod
    def replace(self, key: str, data: bytes, etag: str) -> ObjectInfo:
        """Write the object only if its tag is still `etag`; ConflictError otherwise."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; no error when it is already gone."""

    def local_root(self) -> Path | None:
        """The folder behind this storage when it is a local one (rename-based publishing)."""
        return None


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for an object-store URL (s3://, gs://, az://), False for a local folder."""
    return isinstance(location, str) and location.startswith(REMOTE_SCHEMES)


def open_storage(location: str | os.PathLike[str], **options: object) -> Storage:
    """The storage for a folder path or an object-store URL.

    S3 credentials, region and endpoint come from the standard AWS environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
    AWS_ENDPOINT_URL, ...). Triton's URL forms are accepted: ``s3://bucket/prefix`` and
    ``s3://host:port/bucket/prefix`` (an explicit endpoint, plain HTTP).
    """
    if is_remote(location):
        # Imported only here: a server on a local folder never loads the object-store client.
        from forseti.core.storage.object_store import ObjectStoreStorage

        return ObjectStoreStorage.from_url(str(location), **options)  # type: ignore[arg-type]
    from forseti.core.storage.local import LocalStorage

    return LocalStorage(Path(location))
