"""Keyring file round trip, permissions, rotation and validation."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from pathlib import Path

import pytest

from forseti.core.sealing.keyring import (
    KEYRING_FORMAT,
    Key,
    Keyring,
    KeyringError,
    load_keyring,
)


def _write_doc(path: Path, keys: list[dict[str, str]]) -> None:
    path.write_text(json.dumps({"format": KEYRING_FORMAT, "keys": keys}))
    path.chmod(0o600)


def _entry(key_id: str, secret: bytes) -> dict[str, str]:
    return {
        "id": key_id,
        "created": "2025-01-01T00:00:00Z",
        "secret": base64.b64encode(secret).decode(),
    }


def test_generate_save_load_round_trip_keeps_ids_and_secrets(tmp_path: Path) -> None:
    ring = Keyring.generate()
    ring.add_new_key()
    path = tmp_path / "keyring.json"
    ring.save(path)

    loaded = load_keyring(path)

    assert loaded.key_ids == ring.key_ids
    for key_id in ring.key_ids:
        assert loaded.get(key_id) == ring.get(key_id)


def test_generated_key_has_dated_id_and_32_byte_secret() -> None:
    key = Keyring.generate().newest

    assert re.fullmatch(r"k-\d{8}-[0-9a-f]{8}", key.key_id)
    assert len(key.secret) == 32
    assert key.created.endswith("Z")


def test_saved_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    old_umask = os.umask(0)  # even a permissive umask must not widen the file
    try:
        Keyring.generate().save(path)
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_replaces_existing_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    Keyring.generate().save(path)
    second = Keyring.generate()
    second.save(path)

    assert load_keyring(path).key_ids == second.key_ids
    assert [p.name for p in tmp_path.iterdir()] == ["keyring.json"]


def test_add_new_key_becomes_newest_and_old_keys_stay_retrievable() -> None:
    ring = Keyring.generate()
    old = ring.newest

    new = ring.add_new_key()

    assert ring.newest == new
    assert new.key_id != old.key_id
    assert ring.get(old.key_id) == old
    assert ring.key_ids == [old.key_id, new.key_id]


def test_get_unknown_id_raises_keyring_error() -> None:
    with pytest.raises(KeyringError, match="unknown key id"):
        Keyring.generate().get("k-nope")


def test_load_missing_file_suggests_forseti_keys_new(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"

    with pytest.raises(KeyringError, match="forseti keys new") as info:
        Keyring.load(path)

    assert str(path) in str(info.value)


def test_load_rejects_corrupt_json(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text("{not json")
    path.chmod(0o600)

    with pytest.raises(KeyringError, match="not valid JSON"):
        Keyring.load(path)


def test_load_rejects_wrong_format_tag(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text(json.dumps({"format": "other/9", "keys": [_entry("k1", bytes(32))]}))
    path.chmod(0o600)

    with pytest.raises(KeyringError, match="unsupported format"):
        Keyring.load(path)


def test_load_rejects_wrong_key_length_without_echoing_secret(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    short = b"\xab" * 16
    _write_doc(path, [_entry("k1", short)])

    with pytest.raises(KeyringError, match="16 bytes") as info:
        Keyring.load(path)

    assert base64.b64encode(short).decode() not in str(info.value)


def test_load_rejects_duplicate_ids(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    _write_doc(path, [_entry("k1", bytes(32)), _entry("k1", b"\x01" * 32)])

    with pytest.raises(KeyringError, match="duplicate key id"):
        Keyring.load(path)


def test_load_rejects_empty_key_list(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    _write_doc(path, [])

    with pytest.raises(KeyringError, match="non-empty"):
        Keyring.load(path)


def test_load_refuses_a_keyring_group_or_other_can_read(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    Keyring.generate().save(path)
    path.chmod(0o644)

    with pytest.raises(KeyringError) as refused:
        Keyring.load(path)

    assert f"readable by group/others (mode 0644); run: chmod 600 {path}" in str(refused.value)


def test_key_repr_does_not_contain_secret() -> None:
    key = Key(key_id="k1", secret=b"\x5a" * 32, created="2025-01-01T00:00:00Z")
    text = repr(key) + repr(Keyring([key]))

    assert "secret" not in text
    assert repr(key.secret) not in text
    assert key.secret.hex() not in text
