"""Where a repository's bytes live: a local folder or an object store, behind one interface.

`open_storage("path/or/url")` gives a `Storage`; keys are "/"-separated paths relative to the
repository's root ("policy/3/model.onnx.sealed"). The interface is small on purpose: what the
repository contract needs (list a prefix, read a whole object, stat it, write it, create it
only if absent, replace it only if unchanged) and nothing a local folder cannot also do.
"""

from __future__ import annotations

from forseti.core.storage.base import (
    ConflictError,
    Listing,
    ObjectInfo,
    Storage,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
    TooLarge,
    is_remote,
    open_storage,
)

__all__ = [
    "ConflictError",
    "Listing",
    "ObjectInfo",
    "Storage",
    "StorageError",
    "StorageNotFound",
    "StorageUnavailable",
    "TooLarge",
    "is_remote",
    "open_storage",
]
