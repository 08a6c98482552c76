"""A repository on an object store (S3 and S3-compatible stores; gs:// and az:// through the
same client), with obstore.

obstore was chosen by measurement (docs/fleet.md): the smallest install of the three clients
compared, the fastest small GET against a local S3 server, and conditional writes
(If-None-Match: * to create, If-Match: <etag> to replace) exposed as put modes.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore import exceptions as obx
from obstore.store import AzureStore, GCSStore, S3Store

from forseti.core.storage.base import (
    ConflictError,
    Listing,
    ObjectInfo,
    Storage,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
    TooLarge,
)

# A poll must not hang on a store that stopped answering: a short connect timeout, a bounded
# request time and few retries (the next poll tries again anyway).
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_MAX_RETRIES = 2


def _client_options(allow_http: bool, timeout_s: float, connect_timeout_s: float) -> Any:
    return {
        "allow_http": allow_http,
        "timeout": timedelta(seconds=timeout_s),
        "connect_timeout": timedelta(seconds=connect_timeout_s),
    }


def _retry(max_retries: int, timeout_s: float) -> Any:
    return {
        "max_retries": max_retries,
        "retry_timeout": timedelta(seconds=timeout_s),
        "backoff": {
            "init_backoff": timedelta(milliseconds=50),
            "max_backoff": timedelta(seconds=1),
            "base": 2.0,
        },
    }


def parse_s3_url(url: str) -> tuple[str | None, str, str]:
    """(endpoint or None, bucket, prefix) from Triton's S3 URL forms:
    ``s3://bucket/prefix``, ``s3://host:port/bucket/prefix`` (HTTP) and
    ``s3://https://host:port/bucket/prefix``."""
    rest = url[len("s3://") :]
    scheme = None
    for explicit in ("https", "http"):
        if rest.startswith(explicit + "://"):
            scheme, rest = explicit, rest[len(explicit) + 3 :]
            break
    first, _, tail = rest.partition("/")
    endpoint = None
    if scheme is not None or ":" in first:
        endpoint = f"{scheme or 'http'}://{first}"
        bucket, _, prefix = tail.partition("/")
    else:
        bucket, prefix = first, tail
    if not bucket:
        raise StorageError(f"no bucket in {url!r}; expected s3://bucket/prefix")
    return endpoint, bucket, prefix.strip("/")


class ObjectStoreStorage(Storage):
    """Keys are object names under the URL's prefix."""

    def __init__(self, store: Any, location: str) -> None:
        self._store = store
        self.location = location

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> ObjectStoreStorage:
        """The storage for an s3://, gs:// or az:// URL, configured from the environment."""
        retry = _retry(max_retries, timeout_s)
        location = url.rstrip("/")
        try:
            if url.startswith("s3://"):
                endpoint, bucket, prefix = parse_s3_url(url)
                env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                    "AWS_ENDPOINT_URL"
                )
                chosen = endpoint or env_endpoint
                config: dict[str, Any] = {}
                if endpoint is not None:
                    config["endpoint"] = endpoint
                elif env_endpoint:
                    config["endpoint"] = env_endpoint
                region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                if region:
                    config["region"] = region
                allow_http = bool(chosen and chosen.startswith("http://"))
                store: Any = S3Store(
                    bucket,
                    prefix=prefix or None,
                    client_options=_client_options(allow_http, timeout_s, connect_timeout_s),
                    retry_config=retry,
                    **config,
                )
            elif url.startswith("gs://"):
                store = GCSStore.from_url(
                    url,
                    client_options=_client_options(False, timeout_s, connect_timeout_s),
                    retry_config=retry,
                )
            else:
                store = AzureStore.from_url(
                    url,
                    client_options=_client_options(False, timeout_s, connect_timeout_s),
                    retry_config=retry,
                )
        except obx.BaseError as exc:
            raise StorageError(
                f"cannot use {urlsplit(url).scheme} store: {_first_line(exc)}"
            ) from None
        return cls(store, location)

    def _fail(self, exc: Exception, key: str, action: str) -> StorageError:
        if isinstance(exc, (obx.NotFoundError, FileNotFoundError)):
            return StorageNotFound(f"{key} not found in {self.location}")
        if isinstance(exc, (obx.AlreadyExistsError, obx.PreconditionError)):
            return ConflictError(f"{key} changed or exists in {self.location}")
        return StorageUnavailable(
            f"cannot {action} {key} in {self.location}: {type(exc).__name__}: {_first_line(exc)}"
        )

    def list_dir(self, prefix: str) -> Listing:
        base = prefix.strip("/")
        try:
            found = obstore.list_with_delimiter(self._store, base or None)
        except Exception as exc:
            raise self._fail(exc, base or "/", "list") from None
        listing = Listing()
        for p in found["common_prefixes"]:
            listing.folders.append(p.rstrip("/").rsplit("/", 1)[-1])
        for meta in found["objects"]:
            info = _info(meta)
            listing.objects[info.key.rsplit("/", 1)[-1]] = info
        listing.folders.sort()
        return listing

    def list_all(self, prefix: str) -> list[ObjectInfo]:
        base = prefix.strip("/")
        # A trailing "/" keeps "policy/" from also matching "policy2/...".
        try:
            chunks = obstore.list(self._store, base + "/" if base else None).collect()
        except Exception as exc:
            raise self._fail(exc, base or "/", "list") from None
        return sorted((_info(m) for m in chunks), key=lambda i: i.key)

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        return self.read_object(key, max_bytes)[0]

    def read_object(self, key: str, max_bytes: int | None = None) -> tuple[bytes, ObjectInfo]:
        try:
            result = obstore.get(self._store, key)
            info = _info(result.meta)
            if max_bytes is not None and info.size > max_bytes:
                raise TooLarge(key, info.size, max_bytes)
            return bytes(result.bytes()), info
        except StorageError:
            raise
        except Exception as exc:
            raise self._fail(exc, key, "read") from None

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            return _info(obstore.head(self._store, key))
        except (obx.NotFoundError, FileNotFoundError):
            return None
        except Exception as exc:
            raise self._fail(exc, key, "stat") from None

    def _put(self, key: str, data: bytes, mode: Any) -> ObjectInfo:
        try:
            result = obstore.put(self._store, key, data, mode=mode, use_multipart=False)
        except Exception as exc:
            raise self._fail(exc, key, "write") from None
        return ObjectInfo(key, len(data), str(result.get("e_tag") or ""))

    def write(self, key: str, data: bytes) -> ObjectInfo:
        return self._put(key, data, "overwrite")

    def create(self, key: str, data: bytes) -> ObjectInfo:
        return self._put(key, data, "create")

    def replace(self, key: str, data: bytes, etag: str) -> ObjectInfo:
        return self._put(key, data, {"e_tag": etag})

    def delete(self, key: str) -> None:
        try:
            obstore.delete(self._store, key)
        except (obx.NotFoundError, FileNotFoundError):
            return
        except Exception as exc:
            raise self._fail(exc, key, "delete") from None


def _info(meta: Any) -> ObjectInfo:
    return ObjectInfo(str(meta["path"]), int(meta["size"]), str(meta.get("e_tag") or ""))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
