"""Sealed artifact format: round trip, tamper/move detection, file and repository sealing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forseti.core.sealing.keyring import Key, Keyring
from forseti.core.sealing.seal_repository import SealRepositoryError, seal_repository
from forseti.core.sealing.sealed import (
    SEALED_SUFFIX,
    SealError,
    open_sealed,
    open_sealed_file,
    peek_key_id,
    seal_bytes,
    seal_file,
)

PLAIN = b"\x08\x07onnx-model-bytes" * 64
WHERE = {"model": "cartpole", "version": 3, "filename": "model.onnx"}


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture
def blob(keyring: Keyring) -> bytes:
    return seal_bytes(PLAIN, keyring, **WHERE)


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _header_len(blob: bytes) -> int:
    return 5 + 1 + 1 + blob[6] + 12


def test_round_trip_returns_plaintext(keyring: Keyring, blob: bytes) -> None:
    assert open_sealed(blob, keyring, **WHERE) == PLAIN


def test_sealed_blob_does_not_contain_plaintext(blob: bytes) -> None:
    assert b"onnx-model-bytes" not in blob


def test_sealing_twice_uses_fresh_nonces(keyring: Keyring, blob: bytes) -> None:
    assert seal_bytes(PLAIN, keyring, **WHERE) != blob


def test_empty_plaintext_round_trips(keyring: Keyring) -> None:
    sealed = seal_bytes(b"", keyring, **WHERE)

    assert open_sealed(sealed, keyring, **WHERE) == b""


def test_flipped_ciphertext_byte_fails(keyring: Keyring, blob: bytes) -> None:
    tampered = _flip(blob, _header_len(blob) + 10)

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(tampered, keyring, **WHERE)


def test_flipped_tag_byte_fails(keyring: Keyring, blob: bytes) -> None:
    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(_flip(blob, len(blob) - 1), keyring, **WHERE)


def test_flipped_nonce_byte_in_header_fails(keyring: Keyring, blob: bytes) -> None:
    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(_flip(blob, _header_len(blob) - 1), keyring, **WHERE)


def test_flipped_magic_byte_is_not_a_sealed_artifact(keyring: Keyring, blob: bytes) -> None:
    with pytest.raises(SealError, match="not a sealed artifact"):
        open_sealed(_flip(blob, 0), keyring, **WHERE)


def test_changed_format_version_is_unsupported(keyring: Keyring, blob: bytes) -> None:
    bumped = blob[:5] + bytes([9]) + blob[6:]

    with pytest.raises(SealError, match="unsupported seal format version"):
        open_sealed(bumped, keyring, **WHERE)


def test_every_single_byte_flip_fails(keyring: Keyring) -> None:
    sealed = seal_bytes(b"tiny", keyring, **WHERE)

    for i in range(len(sealed)):
        with pytest.raises(SealError):
            open_sealed(_flip(sealed, i), keyring, **WHERE)


def test_truncated_body_fails(keyring: Keyring, blob: bytes) -> None:
    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(blob[:-1], keyring, **WHERE)


def test_truncated_to_header_only_fails(keyring: Keyring, blob: bytes) -> None:
    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(blob[: _header_len(blob)], keyring, **WHERE)


def test_truncated_header_fails(keyring: Keyring, blob: bytes) -> None:
    with pytest.raises(SealError, match="truncated header"):
        open_sealed(blob[:10], keyring, **WHERE)


def test_plaintext_input_is_not_a_sealed_artifact(keyring: Keyring) -> None:
    with pytest.raises(SealError, match="not a sealed artifact"):
        open_sealed(PLAIN, keyring, **WHERE)


@pytest.mark.parametrize(
    "moved",
    [
        pytest.param({"version": 4}, id="other-version"),
        pytest.param({"model": "lunarlander"}, id="other-model"),
        pytest.param({"filename": "model.plan"}, id="renamed"),
    ],
)
def test_opening_with_other_binding_fails(
    keyring: Keyring, blob: bytes, moved: dict[str, object]
) -> None:
    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(blob, keyring, **{**WHERE, **moved})  # type: ignore[arg-type]


def test_shifting_characters_between_binding_fields_fails(keyring: Keyring) -> None:
    # Naively concatenated, both bindings read "cartpole33model.onnx".
    sealed = seal_bytes(PLAIN, keyring, model="cartpole", version=33, filename="model.onnx")

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(sealed, keyring, model="cartpole", version=3, filename="3model.onnx")


def test_different_key_with_same_id_fails(keyring: Keyring, blob: bytes) -> None:
    impostor = Keyring([Key(keyring.newest.key_id, b"\x00" * 32, keyring.newest.created)])

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(blob, impostor, **WHERE)


def test_unknown_key_id_fails(blob: bytes) -> None:
    with pytest.raises(SealError, match="unknown key id") as info:
        open_sealed(blob, Keyring.generate(), **WHERE)

    assert info.value.reason == "unknown key id"


def test_error_messages_never_contain_key_or_plaintext(keyring: Keyring, blob: bytes) -> None:
    with pytest.raises(SealError) as info:
        open_sealed(_flip(blob, len(blob) - 1), keyring, **WHERE)

    text = str(info.value)
    assert keyring.newest.secret.hex() not in text
    assert "onnx-model-bytes" not in text


def test_peek_key_id_reads_header(keyring: Keyring, blob: bytes) -> None:
    assert peek_key_id(blob) == keyring.newest.key_id


def test_older_key_still_opens_after_rotation(keyring: Keyring, blob: bytes) -> None:
    old_id = keyring.newest.key_id
    keyring.add_new_key()
    resealed = seal_bytes(PLAIN, keyring, **WHERE)

    assert open_sealed(blob, keyring, **WHERE) == PLAIN
    assert peek_key_id(resealed) == keyring.newest.key_id != old_id


def test_seal_file_removes_plaintext_and_output_opens(keyring: Keyring, tmp_path: Path) -> None:
    plain = tmp_path / "model.onnx"
    plain.write_bytes(PLAIN)

    out = seal_file(plain, keyring, model="cartpole", version=3)

    assert out == tmp_path / ("model.onnx" + SEALED_SUFFIX)
    assert not plain.exists()
    assert open_sealed(out.read_bytes(), keyring, **WHERE) == PLAIN
    assert open_sealed_file(out, keyring, model="cartpole", version=3) == PLAIN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx.sealed"]


def test_renamed_sealed_file_fails_to_open(keyring: Keyring, tmp_path: Path) -> None:
    plain = tmp_path / "model.onnx"
    plain.write_bytes(PLAIN)
    out = seal_file(plain, keyring, model="cartpole", version=3)
    renamed = out.rename(tmp_path / "other.onnx.sealed")

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed_file(renamed, keyring, model="cartpole", version=3)


def test_seal_file_refuses_to_replace_existing_sealed_file(
    keyring: Keyring, tmp_path: Path
) -> None:
    plain = tmp_path / "model.onnx"
    plain.write_bytes(PLAIN)
    existing = tmp_path / "model.onnx.sealed"
    existing.write_bytes(b"previous")

    with pytest.raises(SealError, match="already exists"):
        seal_file(plain, keyring, model="cartpole", version=3)

    assert existing.read_bytes() == b"previous"
    assert plain.exists()


def _make_repo(root: Path) -> Path:
    repo = root / "models"
    for model, versions in {"cartpole": (1, 2), "lunar": (7,)}.items():
        model_dir = repo / model
        model_dir.mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(f'name: "{model}"\n')
        for v in versions:
            vdir = model_dir / str(v)
            vdir.mkdir()
            (vdir / "model.onnx").write_bytes(f"{model}-{v}-onnx".encode())
            (vdir / "model.safetensors").write_bytes(f"{model}-{v}-st".encode())
    hidden = repo / "cartpole" / ".publish-tmp-3"
    hidden.mkdir()
    (hidden / "model.onnx").write_bytes(b"in progress")
    (repo / "cartpole" / "1" / ".DS_Store").write_bytes(b"junk")
    notes = repo / "cartpole" / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a version")
    return repo


def test_seal_repository_seals_every_version_file_and_leaves_no_plaintext(
    keyring: Keyring, tmp_path: Path
) -> None:
    repo = _make_repo(tmp_path)

    sealed = seal_repository(repo, keyring)

    rel = sorted(str(p.relative_to(repo)) for p in sealed)
    assert rel == [
        "cartpole/1/model.onnx.sealed",
        "cartpole/1/model.safetensors.sealed",
        "cartpole/2/model.onnx.sealed",
        "cartpole/2/model.safetensors.sealed",
        "lunar/7/model.onnx.sealed",
        "lunar/7/model.safetensors.sealed",
    ]
    for vdir in (repo / "cartpole" / "1", repo / "cartpole" / "2", repo / "lunar" / "7"):
        visible = [p.name for p in vdir.iterdir() if not p.name.startswith(".")]
        assert all(name.endswith(SEALED_SUFFIX) for name in visible)
    blob = (repo / "lunar" / "7" / "model.onnx.sealed").read_bytes()
    assert open_sealed(blob, keyring, model="lunar", version=7, filename="model.onnx") == (
        b"lunar-7-onnx"
    )


def test_seal_repository_skips_config_hidden_and_non_version_entries(
    keyring: Keyring, tmp_path: Path
) -> None:
    repo = _make_repo(tmp_path)

    seal_repository(repo, keyring)

    assert (repo / "cartpole" / "config.pbtxt").read_text() == 'name: "cartpole"\n'
    assert (repo / "cartpole" / ".publish-tmp-3" / "model.onnx").read_bytes() == b"in progress"
    assert (repo / "cartpole" / "1" / ".DS_Store").read_bytes() == b"junk"
    assert (repo / "cartpole" / "notes" / "readme.txt").exists()


def test_seal_repository_leaves_the_trainers_version_manifest_plain(
    keyring: Keyring, tmp_path: Path
) -> None:
    repo = _make_repo(tmp_path)
    (repo / "cartpole" / "1" / "manifest.json").write_text('{"training_run": "r"}\n')

    sealed = seal_repository(repo, keyring)

    assert (repo / "cartpole" / "1" / "manifest.json").read_text() == '{"training_run": "r"}\n'
    assert not any(p.name == "manifest.json.sealed" for p in sealed)


def test_seal_repository_is_idempotent(keyring: Keyring, tmp_path: Path) -> None:
    repo = _make_repo(tmp_path)
    seal_repository(repo, keyring)

    assert seal_repository(repo, keyring) == []


def test_seal_repository_reports_plaintext_next_to_sealed_but_seals_the_rest(
    keyring: Keyring, tmp_path: Path
) -> None:
    repo = _make_repo(tmp_path)
    clash = repo / "cartpole" / "2" / "model.onnx.sealed"
    clash.write_bytes(b"older seal")

    with pytest.raises(SealRepositoryError, match=r"cartpole/2/model\.onnx") as info:
        seal_repository(repo, keyring)

    assert len(info.value.problems) == 1
    assert len(info.value.sealed) == 5
    assert clash.read_bytes() == b"older seal"
    assert (repo / "cartpole" / "2" / "model.onnx").exists()
    assert not (repo / "lunar" / "7" / "model.onnx").exists()


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_seal_repository_reports_symlinked_model_files(keyring: Keyring, tmp_path: Path) -> None:
    repo = _make_repo(tmp_path)
    target = tmp_path / "shared.onnx"
    target.write_bytes(b"shared")
    (repo / "lunar" / "7" / "extra.onnx").symlink_to(target)

    with pytest.raises(SealRepositoryError, match="symlink"):
        seal_repository(repo, keyring)

    assert target.read_bytes() == b"shared"
