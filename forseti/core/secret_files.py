"""Reading secret files (keyrings, token files, TLS private keys) only when they are private.

A secret file must be owned by the user forseti runs as and give group and others no access
(mode 0600 or 0400). Anything else is refused, with the chmod or chown that fixes it: a
secret that other local users can read is no longer a secret, and loading it with a warning
leaves it exposed. The check is made on the opened file (fstat), so the file that is checked
is the file that is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class SecretFileError(Exception):
    """A secret file is readable by others or owned by another user; the message says which
    command fixes it and never contains the secret."""


def secret_file_problem(st: os.stat_result, path: Path | str, what: str) -> str | None:
    """Why the file `st` describes may not hold a secret, or None when it may."""
    euid = os.geteuid()
    if st.st_uid != euid:
        return (
            f"{what} {path} is owned by uid {st.st_uid}, the server runs as uid {euid}; "
            f"run: chown {euid} {path} (or run forseti as uid {st.st_uid})"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        access = "readable" if mode & (stat.S_IRGRP | stat.S_IROTH) else "accessible"
        return f"{what} {path} is {access} by group/others (mode {mode:04o}); run: chmod 600 {path}"
    return None


def read_secret_file(path: Path | str, what: str) -> tuple[bytes, os.stat_result]:
    """The bytes of a secret file and its stat, read only when the file is private.

    Raises OSError when it cannot be opened or read, SecretFileError when it is not a regular
    file, is owned by another user or gives group/others any access.
    """
    with open(path, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"{what} {path} is not a regular file")
        problem = secret_file_problem(st, path, what)
        if problem is not None:
            raise SecretFileError(problem)
        return handle.read(), st
