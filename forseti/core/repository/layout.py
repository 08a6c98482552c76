"""Triton's repository layout: model folders, integer version folders, version policy."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.errors import ModelLoadError
from forseti.core.sealing.sealed import SEALED_SUFFIX

# A version folder's description of where it came from (written by the trainer): plain JSON
# with no secret in it, never a model file, so it is neither sealed nor served.
VERSION_MANIFEST = "manifest.json"

log = logging.getLogger(__name__)

# A version number is written in ASCII digits with no leading zero ("0" itself is version 0,
# as Triton allows), at most 18 digits so that it always fits in an int64. `str.isdigit()`
# is not the test: it accepts "²" (which int() then refuses) and "٣" (which int() reads as 3).
MAX_VERSION_DIGITS = 18
_VERSION_NAME = re.compile(rf"0|[1-9][0-9]{{0,{MAX_VERSION_DIGITS - 1}}}")

# Folders already warned about, so that a poll every second does not repeat the warning
# forever; bounded so that a folder full of odd names cannot grow it without end.
_warned: set[str] = set()
_WARNED_LIMIT = 4096


def parse_version_name(name: str) -> int | None:
    """The version number a folder name stands for, or None when it is not a version name:
    ASCII digits only, no sign, no spaces, no leading zero (except "0"), at most 18 digits."""
    if _VERSION_NAME.fullmatch(name) is None:  # fullmatch: "1\n" is not "1"
        return None
    return int(name)


def warn_not_a_version(folder: Path | str) -> None:
    """Log, once per folder, that a folder among the versions is skipped (later: debug)."""
    key = os.fspath(folder)
    if key in _warned:
        log.debug("skipping folder that is not a version number: %r", key)
        return
    if len(_warned) >= _WARNED_LIMIT:
        _warned.clear()
    _warned.add(key)
    log.warning(
        "skipping folder %r: a version folder is named by its number in ASCII digits, "
        "without leading zeros (at most %d digits)",
        key,
        MAX_VERSION_DIGITS,
    )


def is_hidden(name: str) -> bool:
    """Hidden entries (publishers' temporary folders among them) are never served."""
    return name.startswith(".")


def list_models(repo: Path) -> list[str]:
    """Model folder names in a repository, sorted."""
    try:
        entries = list(os.scandir(repo))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries if e.is_dir() and not is_hidden(e.name))


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """Integer, non-hidden version folders of a model. Other visible folders are skipped,
    with a warning the first time each is seen (see parse_version_name)."""
    found: dict[int, Path] = {}
    try:
        entries = list(os.scandir(model_dir))
    except FileNotFoundError:
        return found
    for e in entries:
        if is_hidden(e.name) or not e.is_dir():
            continue
        number = parse_version_name(e.name)
        if number is None:
            warn_not_a_version(e.path)
            continue
        found[number] = Path(e.path)
    return found


def select_versions(policy: mc.ModelVersionPolicy, available: list[int]) -> list[int]:
    """Apply Triton's version_policy; the default is the latest one version."""
    ordered = sorted(available)
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return ordered
    if which == "specific":
        return sorted(v for v in set(policy.specific.versions) if v in set(ordered))
    n = policy.latest.num_versions if which == "latest" else 1
    if n < 1:
        raise ModelLoadError("version_policy latest.num_versions must be >= 1")
    return ordered[-n:]


@dataclass(frozen=True)
class Artifact:
    """A version's model file: sealed unless plaintext was allowed and found."""

    path: Path
    filename: str  # the plaintext name bound into the seal, e.g. "model.onnx"
    sealed: bool

    def fingerprint(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return (st.st_ino, st.st_size, st.st_mtime_ns)


# The largest artifact file a server reads unless told otherwise (--max-artifact-bytes): far
# above any policy network, and a bound on what one load holds in memory (the sealed bytes,
# then the opened ones).
DEFAULT_MAX_ARTIFACT_BYTES = 2 * 1024**3


def find_artifact(version_dir: Path, filename: str, allow_plaintext: bool) -> Artifact:
    """Locate `<filename>.sealed` (or the plaintext file, only when allowed)."""
    sealed = version_dir / (filename + SEALED_SUFFIX)
    if sealed.is_file():
        return Artifact(sealed, filename, True)
    plain = version_dir / filename
    if plain.is_file():
        if allow_plaintext:
            return Artifact(plain, filename, False)
        raise ModelLoadError(
            f"found plaintext '{filename}' but plaintext artifacts are refused; "
            "seal it with `forseti seal` or start the server with --allow-plaintext"
        )
    raise ModelLoadError(f"missing artifact '{filename}{SEALED_SUFFIX}' in version folder")
