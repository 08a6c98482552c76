"""An artifact over --max-artifact-bytes is refused before it is read; the live one serves."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from forseti.core.errors import ModelLoadError
from forseti.core.sealing.keyring import Keyring
from forseti.server.registry.model_registry import ModelRegistry
from testkit.model_builders import POLICY_CONFIG, policy_onnx, publish_sealed, write_config


def test_an_artifact_over_the_limit_is_refused_and_the_live_version_keeps_serving(
    tmp_path: Path, keyring: Keyring
) -> None:
    repo = tmp_path / "repo"
    write_config(repo, "policy", POLICY_CONFIG)
    publish_sealed(repo, "policy", policy_onnx(1), keyring, version=1)
    small = (repo / "policy" / "1").iterdir().__next__().stat().st_size
    big = policy_onnx(2, hidden=512)  # several times the small one's size

    async def main() -> tuple[str, int]:
        registry = ModelRegistry(repo, keyring, False, max_artifact_bytes=small + 1024)
        await registry.load_model("policy")
        publish_sealed(repo, "policy", big, keyring, version=2)
        with pytest.raises(ModelLoadError) as caught:
            await registry.load_model("policy")
        serving = registry.route("policy", "").version
        registry.release_all()
        return caught.value.reason, serving

    reason, serving = asyncio.run(main())
    assert "over the server's limit" in reason and "--max-artifact-bytes" in reason
    assert serving == 1


def test_serve_takes_the_limit_from_its_flag(
    tmp_path: Path, keyring: Keyring, start_server
) -> None:
    repo = tmp_path / "repo"
    write_config(repo, "policy", POLICY_CONFIG)
    publish_sealed(repo, "policy", policy_onnx(1), keyring, version=1)
    server = start_server(repo, "--max-artifact-bytes", "100", wait_ready=False)
    server.wait(
        lambda c: "limit of 100 (--max-artifact-bytes)" in str(c.get_model_repository_index()),
        timeout=30,
    )
    client = server.client()
    try:
        assert not client.is_model_ready("policy")
    finally:
        client.close()
