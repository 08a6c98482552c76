"""Secret files fail closed (issue 13, findings 3 and 7).

A token file that becomes empty, missing or unparsable leaves its group with no valid token
(against a real server), and an atomic replacement with a new token takes effect at the next
check. A keyring, token file or TLS private key that group/others can read, or that another
user owns, is refused with the command that fixes it.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from forseti.core.sealing.keyring import Keyring, KeyringError, load_keyring
from forseti.core.secret_files import SecretFileError, read_secret_file
from forseti.server.security.restricted import (
    HEADER_PREFIX,
    RestrictedProtocols,
    RestrictionError,
    parse_restriction,
)
from forseti.server.security.tls import TlsError, load_server_pair
from testkit.certificates import make_certificates
from testkit.model_builders import build_repository
from testkit.server_process import ServerProcess, run_forseti, serve_args

HEADER = f"{HEADER_PREFIX}admin"
WAIT_SECS = 15.0  # the server checks token files every 2 s


def _token() -> str:
    return f"t-{secrets.token_urlsafe(18)}"


def _replace(path: Path, text: str) -> None:
    """An operator's atomic edit: a new private file renamed over the old one."""
    staged = path.with_name(path.name + ".new")
    staged.write_text(text)
    staged.chmod(0o600)
    os.replace(staged, path)


def _eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_SECS
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


class Guarded:
    """A real server whose model-repository group takes its tokens from `tokens`."""

    def __init__(self, server: ServerProcess, tokens: Path) -> None:
        self.server, self.tokens = server, tokens
        self.client = server.client()

    def accepted(self, token: str) -> bool:
        try:
            self.client.get_model_repository_index(headers={HEADER: token})
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.PERMISSION_DENIED", exc
            return False
        return True

    def reset(self) -> str:
        """A fresh valid token in the file, once the server accepts it."""
        token = _token()
        _replace(self.tokens, token + "\n")
        assert _eventually(lambda: self.accepted(token)), self.server.log()
        return token


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path
) -> Iterator[Guarded]:
    root = tmp_path_factory.mktemp("secret-files")
    repo = root / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    tokens = root / "admin.tokens"
    tokens.write_text(_token() + "\n")
    tokens.chmod(0o600)
    server = ServerProcess(
        repo, keyring_path, ["--grpc-restricted-protocol", f"model-repository:admin=@{tokens}"]
    ).start()
    g = Guarded(server, tokens)
    yield g
    g.client.close()
    server.stop()


# ---- F3: revoking tokens fails closed, against a real server ------------------------------


def test_an_emptied_token_file_refuses_every_call(guarded: Guarded) -> None:
    token = guarded.reset()
    guarded.tokens.write_text("")  # in place, as `: > file` would
    assert _eventually(lambda: not guarded.accepted(token))
    assert "holds no token" in guarded.server.log()


def test_a_deleted_token_file_refuses_every_call(guarded: Guarded) -> None:
    token = guarded.reset()
    guarded.tokens.unlink()
    assert _eventually(lambda: not guarded.accepted(token))
    assert "cannot read token file" in guarded.server.log()


def test_a_token_file_with_only_invalid_lines_refuses_every_call(guarded: Guarded) -> None:
    token = guarded.reset()
    _replace(guarded.tokens, "two words\n\x07bell\n")
    assert _eventually(lambda: not guarded.accepted(token))
    assert "printable ASCII" in guarded.server.log()


def test_a_token_file_made_readable_by_others_refuses_every_call(guarded: Guarded) -> None:
    token = guarded.reset()
    guarded.tokens.chmod(0o644)
    assert _eventually(lambda: not guarded.accepted(token))
    assert f"run: chmod 600 {guarded.tokens}" in guarded.server.log()


def test_a_replaced_token_file_accepts_the_new_token_and_refuses_the_old(
    guarded: Guarded,
) -> None:
    old = guarded.reset()
    guarded.tokens.write_text("")  # revoke everything first
    assert _eventually(lambda: not guarded.accepted(old))
    new = _token()
    _replace(guarded.tokens, new + "\n")
    assert _eventually(lambda: guarded.accepted(new)), guarded.server.log()
    assert not guarded.accepted(old)


def test_an_unusable_token_file_is_logged_once_per_change(tmp_path: Path, caplog) -> None:
    tokens = tmp_path / "t"
    token = _token()
    _replace(tokens, token + "\n")
    restrictions = RestrictedProtocols.from_settings([f"model-repository:k=@{tokens}"])
    tokens.unlink()
    for _ in range(3):
        restrictions.reload_changed_files()
    assert not restrictions.groups[0].accepts(token)
    assert caplog.text.count("token file unusable") == 1
    _replace(tokens, token + "\n")
    restrictions.reload_changed_files()
    assert restrictions.groups[0].accepts(token)
    assert token not in caplog.text


# ---- F7: secrets that others can read are refused -----------------------------------------


def test_a_keyring_readable_by_others_is_refused_with_the_chmod(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    Keyring.generate().save(path)
    path.chmod(0o644)
    with pytest.raises(KeyringError) as refused:
        load_keyring(path)
    message = str(refused.value)
    assert f"keyring {path} is readable by group/others (mode 0644)" in message
    assert f"run: chmod 600 {path}" in message


def test_a_keyring_readable_by_others_stops_the_server(
    tmp_path: Path, repository: Path, keyring_path: Path
) -> None:
    shared = tmp_path / "shared-keyring.json"
    shared.write_bytes(keyring_path.read_bytes())
    shared.chmod(0o640)
    done = run_forseti(*serve_args(repository, shared, "--grpc-address", "127.0.0.1"), timeout=30)
    assert done.returncode != 0
    assert f"run: chmod 600 {shared}" in done.stderr
    assert "grpc listening" not in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_keyring_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    Keyring.generate().save(path)
    os.chown(path, 4242, -1)
    with pytest.raises(KeyringError, match="owned by uid 4242, the server runs as uid 0"):
        Keyring.load(path)


def test_a_token_file_readable_by_group_is_refused(tmp_path: Path) -> None:
    tokens = tmp_path / "t"
    tokens.write_text(_token() + "\n")
    tokens.chmod(0o640)
    with pytest.raises(RestrictionError, match=r"readable by group/others \(mode 0640\)"):
        parse_restriction(f"model-repository:k=@{tokens}", env={})


def test_a_token_file_readable_by_group_stops_the_server(
    tmp_path: Path, repository: Path, keyring_path: Path
) -> None:
    tokens = tmp_path / "admin.tokens"
    token = _token()
    tokens.write_text(token + "\n")
    tokens.chmod(0o640)
    done = run_forseti(
        *serve_args(
            repository,
            keyring_path,
            "--grpc-address",
            "127.0.0.1",
            f"--grpc-restricted-protocol=model-repository:admin=@{tokens}",
        ),
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert f"token file {tokens} is readable by group/others (mode 0640)" in done.stderr
    assert f"run: chmod 600 {tokens}" in done.stderr
    assert token not in done.stderr + done.stdout


def test_a_tls_key_readable_by_others_stops_the_server(
    tmp_path: Path, repository: Path, keyring_path: Path
) -> None:
    certs = make_certificates(tmp_path / "certs")
    certs.server.key.chmod(0o644)
    done = run_forseti(
        *serve_args(
            repository,
            keyring_path,
            "--grpc-address",
            "127.0.0.1",
            "--grpc-use-ssl",
            "--grpc-server-cert",
            str(certs.server.cert),
            "--grpc-server-key",
            str(certs.server.key),
        ),
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert f"{certs.server.key} is readable by group/others (mode 0644)" in done.stderr
    assert f"run: chmod 600 {certs.server.key}" in done.stderr
    assert "BEGIN" not in done.stderr  # no key material


def test_a_metrics_tls_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    certs.server.key.chmod(0o604)
    with pytest.raises(TlsError, match=r"--metrics-ssl-key.*readable by group/others"):
        load_server_pair(
            certs.server.cert, certs.server.key, "--metrics-ssl-cert", "--metrics-ssl-key"
        )


def test_group_write_alone_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_text("x")
    path.chmod(0o620)
    with pytest.raises(SecretFileError, match=r"accessible by group/others \(mode 0620\)"):
        read_secret_file(path, "secret")


def test_owner_only_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_text("x")
    for mode in (0o600, 0o400):
        path.chmod(mode)
        assert read_secret_file(path, "secret")[0] == b"x"
