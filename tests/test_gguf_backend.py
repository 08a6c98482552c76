"""The gguf backend: malformed or hostile policy files and configs refused with reasons, and
GGUF policies served by a real server answering like the ONNX export of the same policy."""

from __future__ import annotations

import io
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from stable_baselines3 import PPO, SAC
from tritonclient.utils import InferenceServerException

from forseti.core.errors import ModelLoadError
from forseti.core.gguf import policy_format as fmt
from forseti.core.repository.config import ModelSpec, model_spec, parse_config_text
from forseti.core.repository.publish import publish_version
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import seal_stream
from forseti.exporters.gguf_policy import export_gguf
from forseti.exporters.model_config import policy_config_text
from forseti.exporters.onnx_export import export_onnx
from forseti.exporters.parity import rollout_observations, sample_observations
from forseti.exporters.policy_description import PolicyDescription, describe_policy
from forseti.server.backends.gguf_backend import GGUFPolicyBackend
from testkit.model_builders import authenticate_model, publish_sealed, write_config
from testkit.server_process import ServerProcess

GGUF = "model.gguf"


# ---- building files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cartpole() -> PolicyDescription:
    """An untrained CartPole PPO policy: 4 -> 64 -> 64 -> 2, value head, logits."""
    return describe_policy(PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu"))


@pytest.fixture(scope="module")
def good(cartpole: PolicyDescription) -> bytes:
    return export_gguf(cartpole)


def spec_for(
    desc: PolicyDescription, name: str = "policy", replace: list[tuple[str, str]] | None = None
) -> ModelSpec:
    text = policy_config_text(name, desc, max_batch_size=64, parameters={}, backend="gguf")
    for old, new in replace or []:
        assert old in text, old
        text = text.replace(old, new)
    return model_spec(parse_config_text(text, name), name)


KV = tuple[Any, GGUFValueType, GGUFValueType | None]


def rebuild(
    blob: bytes,
    tmp_path: Path,
    *,
    arch: str = fmt.ARCHITECTURE,
    drop_keys: tuple[str, ...] = (),
    set_keys: dict[str, KV] | None = None,
    drop_tensors: tuple[str, ...] = (),
    set_tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType | None]] | None = None,
) -> bytes:
    """Read a GGUF file with gguf.GGUFReader and write it again with gguf.GGUFWriter, changed."""
    src = tmp_path / "src.gguf"
    src.write_bytes(blob)
    reader = GGUFReader(src)
    out = tmp_path / "changed.gguf"
    writer = GGUFWriter(out, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_keys:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), GGUFValueType.ARRAY, field.types[1])
        else:
            writer.add_key_value(name, field.contents(), field.types[0])
    for name, (value, vtype, sub) in (set_keys or {}).items():
        writer.add_key_value(name, value, vtype, sub)
    replaced = dict(set_tensors or {})
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        if t.name in replaced:
            data, qtype = replaced.pop(t.name)
            writer.add_tensor(t.name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, (data, qtype) in replaced.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out.read_bytes()


def raw_gguf(n_tensors: int, kvs: list[bytes]) -> bytes:
    """A hand-made GGUF header (for counts no writer would produce)."""
    head = struct.pack("<IIQQ", 0x46554747, 3, n_tensors, len(kvs))
    return head + b"".join(kvs)


def kv_u8_array(key: str, count: int) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IIQ", 9, 0, count)


def refused(blob: bytes, spec: ModelSpec) -> str:
    with pytest.raises(ModelLoadError) as excinfo:
        GGUFPolicyBackend(spec, blob)
    return str(excinfo.value)


# ---- the file is refused, with its reason ---------------------------------------------------


def test_valid_file_loads_and_answers_a_batch(good: bytes, cartpole: PolicyDescription) -> None:
    backend = GGUFPolicyBackend(spec_for(cartpole), good)
    obs = np.zeros((3, 4), np.float32)

    action, value, logits = backend.run({"obs": obs}, ["action", "value", "logits"])

    assert action.dtype == np.int64 and action.shape == (3, 1)
    assert value.dtype == np.float32 and value.shape == (3, 1)
    assert logits.shape == (3, 2)


F = fmt
T = GGUFValueType
W0 = "actor.0.weight"

MALFORMED: dict[str, tuple[dict[str, Any], str]] = {
    "missing_key": ({"drop_keys": (F.K_OBS_DIM,)}, f"missing metadata key '{F.K_OBS_DIM}'"),
    "missing_tensor": ({"drop_tensors": ("value.1.bias",)}, "missing tensor 'value.1.bias'"),
    "weight_of_wrong_shape": (
        {"set_tensors": {W0: (np.zeros((64, 5), np.float32), None)}},
        "tensor 'actor.0.weight' is F32 [64, 5]; expected a weight [out, 4]",
    ),
    "bias_of_wrong_length": (
        {"set_tensors": {"actor.0.bias": (np.zeros(63, np.float32), None)}},
        "tensor 'actor.0.bias' is F32 [63]; expected F32 [64]",
    ),
    "bias_as_f16": (
        {"set_tensors": {"actor.0.bias": (np.zeros(64, np.float16), None)}},
        "expected F32 [64]",
    ),
    "oversized_dims": (
        {"set_tensors": {W0: (np.zeros((1, 70000), np.float16), None)}},
        "outside 1..65536",
    ),
    "oversized_obs_dim_key": ({"set_keys": {F.K_OBS_DIM: (10**6, T.UINT32, None)}}, "outside"),
    "unknown_activation": (
        {"set_keys": {F.K_ACTOR_ACTIVATIONS: (["tanh", "swish", "identity"], T.ARRAY, T.STRING)}},
        "unknown activation 'swish'",
    ),
    "key_of_wrong_type": (
        {"set_keys": {F.K_OBS_DIM: ("4", T.STRING, None)}},
        "is STRING; expected UINT32",
    ),
    "unknown_key_in_namespace": (
        {"set_keys": {"forseti.policy.temperature": (1.0, T.FLOAT32, None)}},
        "unknown metadata keys ['forseti.policy.temperature']",
    ),
    "newer_format_version": (
        {"set_keys": {F.K_FORMAT_VERSION: (2, T.UINT32, None)}},
        "policy format version 2",
    ),
    "not_a_policy_architecture": ({"arch": "llama"}, "not a policy"),
    "head_disagrees_with_n_actions": (
        {"set_keys": {F.K_N_ACTIONS: (3, T.UINT32, None)}},
        "actor head has 2 outputs for n_actions 3",
    ),
    "output_names_disagree": (
        {"set_keys": {F.K_OUTPUT_NAMES: (["action", "logits"], T.ARRAY, T.STRING)}},
        "do not match the structure",
    ),
    "extra_tensor": (
        {"set_tensors": {"actor.9.weight": (np.zeros((2, 2), np.float32), None)}},
        "unexpected tensors ['actor.9.weight']",
    ),
    "nan_weight": (
        {"set_tensors": {W0: (np.full((64, 4), np.nan, np.float32), None)}},
        "tensor 'actor.0.weight' holds NaN or infinite values",
    ),
    "box_keys_in_a_discrete_policy": (
        {"set_keys": {F.K_ACTION_DIM: (2, T.UINT32, None)}},
        "do not belong to this policy",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_policy_is_refused_with_its_reason(
    case: str, good: bytes, cartpole: PolicyDescription, tmp_path: Path
) -> None:
    changes, reason = MALFORMED[case]

    message = refused(rebuild(good, tmp_path, **changes), spec_for(cartpole))

    assert reason in message


@pytest.mark.parametrize("cut", [8, 200, -1000, -1])
def test_truncated_file_is_refused(good: bytes, cartpole: PolicyDescription, cut: int) -> None:
    message = refused(good[:cut], spec_for(cartpole))

    assert "truncated" in message


def test_bytes_appended_after_the_tensor_data_are_refused(
    good: bytes, cartpole: PolicyDescription
) -> None:
    assert "unexpected bytes after the tensor data" in refused(
        good + b"\0" * 64, spec_for(cartpole)
    )


def test_not_a_gguf_file_is_refused(cartpole: PolicyDescription) -> None:
    assert "bad magic" in refused(b"\x08\x07onnx bytes, not gguf" * 8, spec_for(cartpole))


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (raw_gguf(2**60, []), "tensors; a policy has at most"),
        (raw_gguf(0, [kv_u8_array("forseti.policy.x", 2**40)]), "array of 1099511627776 items"),
        (raw_gguf(0, [kv_u8_array("forseti.policy.x", 60000)]), "runs past the end"),
    ],
    ids=["tensor_count", "array_length", "array_past_end"],
)
def test_hostile_counts_are_refused_quickly(
    blob: bytes, reason: str, cartpole: PolicyDescription
) -> None:
    started = time.perf_counter()

    message = refused(blob, spec_for(cartpole))

    assert reason in message
    assert time.perf_counter() - started < 1.0


CONFIG_FAULTS: dict[str, tuple[list[tuple[str, str]], str]] = {
    "obs_dims": ([("dims: 4", "dims: 8")], "input 'obs': config says FP32 [-1, 8]"),
    "action_type": ([("TYPE_INT64", "TYPE_FP32")], "output 'action'"),
    "unknown_output": ([('name: "logits"', 'name: "q_values"')], "'q_values' is not in"),
    "parameter": ([('string_value: "PPO"', 'string_value: "DQN"')], "contradicts the gguf"),
    "gpu_instances": ([("KIND_CPU", "KIND_GPU")], "runs on CPU"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FAULTS))
def test_config_that_does_not_fit_the_file_is_refused(
    case: str, good: bytes, cartpole: PolicyDescription
) -> None:
    replace, reason = CONFIG_FAULTS[case]

    assert reason in refused(good, spec_for(cartpole, replace=replace))


def test_config_may_declare_a_subset_of_outputs(good: bytes, cartpole: PolicyDescription) -> None:
    text = policy_config_text("policy", cartpole, max_batch_size=8, parameters={}, backend="gguf")
    config = parse_config_text(text, "policy")
    del config.output[1:]  # action only
    backend = GGUFPolicyBackend(model_spec(config, "policy"), good)

    (action,) = backend.run({"obs": np.ones((2, 4), np.float32)}, ["action"])

    assert action.shape == (2, 1)


# ---- served: the same decisions as the ONNX export ------------------------------------------


def _trained_cartpole() -> PolicyDescription:
    # A few thousand steps: enough for decisive logits (an untrained policy sits near ties).
    model = PPO(
        "MlpPolicy",
        "CartPole-v1",
        seed=0,
        device="cpu",
        n_steps=512,
        batch_size=128,
        n_epochs=4,
    )
    return describe_policy(model.learn(4096))


def _pendulum() -> PolicyDescription:
    return describe_policy(SAC("MlpPolicy", "Pendulum-v1", seed=0, device="cpu"))


FAMILIES: dict[str, tuple[Callable[[], PolicyDescription], str]] = {
    "cartpole": (_trained_cartpole, "CartPole-v1"),
    "pendulum": (_pendulum, "Pendulum-v1"),
}
WEIGHT_TYPES = ("f32", "f16", "q8_0")


def _publish(
    repo: Path, keyring: Keyring, name: str, desc: PolicyDescription, backend: str, blob: bytes
) -> None:
    text = policy_config_text(
        name,
        desc,
        max_batch_size=64,
        parameters={},
        backend=backend,  # type: ignore[arg-type]
    )
    write_config(repo, name, text)
    filename = GGUF if backend == "gguf" else "model.onnx"
    publish_sealed(repo, name, blob, keyring, version=1, filename=filename)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path):
    """One server with each family as ONNX and as GGUF in every weight type, all sealed."""
    repo = tmp_path_factory.mktemp("gguf") / "repo"
    repo.mkdir()
    observations = {}
    for family, (make, env_id) in FAMILIES.items():
        desc = make()
        _publish(repo, keyring, f"{family}_onnx", desc, "onnxruntime", export_onnx(desc))
        for wt in WEIGHT_TYPES:
            blob = export_gguf(desc, weight_type=wt)
            _publish(repo, keyring, f"{family}_{wt}", desc, "gguf", blob)
        space_obs = sample_observations(_space(env_id), 512, np.random.default_rng(len(family)))
        observations[family] = np.concatenate([space_obs, rollout_observations(env_id, 512, 0)])
    server = ServerProcess(
        repo, keyring_path, ["--model-control-mode", "explicit", "--load-model", "*"]
    )
    server.start()
    client = grpcclient.InferenceServerClient(server.url)
    yield client, observations
    client.close()
    server.stop()


def _space(env_id: str) -> Any:
    import gymnasium as gym

    env = gym.make(env_id)
    try:
        return env.observation_space
    finally:
        env.close()


def _ask(
    client: grpcclient.InferenceServerClient, model: str, obs: np.ndarray, outputs: list[str]
) -> dict[str, np.ndarray]:
    """Answers for every observation, in requests of 64 (the config's max_batch_size)."""
    parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
    for start in range(0, len(obs), 64):
        batch = obs[start : start + 64]
        inp = grpcclient.InferInput("obs", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        result = client.infer(
            model, [inp], outputs=[grpcclient.InferRequestedOutput(o) for o in outputs]
        )
        for o in outputs:
            parts[o].append(result.as_numpy(o))
    return {o: np.concatenate(p) for o, p in parts.items()}


@pytest.mark.slow
def test_served_f32_gguf_decisions_equal_onnx(served) -> None:
    client, observations = served
    for family, outputs in (("cartpole", ["action", "value", "logits"]), ("pendulum", ["action"])):
        obs = observations[family]
        onnx_out = _ask(client, f"{family}_onnx", obs, outputs)
        gguf_out = _ask(client, f"{family}_f32", obs, outputs)
        assert len(obs) >= 1000
        for name in outputs:
            if onnx_out[name].dtype == np.int64:
                np.testing.assert_array_equal(gguf_out[name], onnx_out[name], err_msg=name)
            else:
                err = np.abs(gguf_out[name] - onnx_out[name]).max()
                assert err <= 1e-5, f"{family} {name}: max abs error {err}"


@pytest.mark.slow
@pytest.mark.parametrize("weight_type", ["f16", "q8_0"])
def test_served_reduced_precision_keeps_every_discrete_action(served, weight_type: str) -> None:
    client, observations = served
    obs = observations["cartpole"]
    onnx_out = _ask(client, "cartpole_onnx", obs, ["action", "logits"])

    gguf_out = _ask(client, f"cartpole_{weight_type}", obs, ["action", "logits"])

    assert len(obs) >= 1000
    np.testing.assert_array_equal(gguf_out["action"], onnx_out["action"])
    err = float(np.abs(gguf_out["logits"] - onnx_out["logits"]).max())
    print(f"cartpole {weight_type}: {len(obs)} actions equal, logits max abs error {err:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize(("weight_type", "bound"), [("f16", 5e-3), ("q8_0", 5e-2)])
def test_served_reduced_precision_continuous_error_is_small(
    served, weight_type: str, bound: float
) -> None:
    client, observations = served
    obs = observations["pendulum"]
    onnx_out = _ask(client, "pendulum_onnx", obs, ["action"])

    gguf_out = _ask(client, f"pendulum_{weight_type}", obs, ["action"])

    err = float(np.abs(gguf_out["action"] - onnx_out["action"]).max())
    print(f"pendulum {weight_type}: action max abs error {err:.2e} over {len(obs)} observations")
    assert err < bound


def test_policy_sealed_in_chunked_format_2_is_served(
    good: bytes, cartpole: PolicyDescription, repository: Path, keyring: Keyring, start_server
) -> None:
    write_config(
        repository,
        "chunked",
        policy_config_text("chunked", cartpole, max_batch_size=64, parameters={}, backend="gguf"),
    )

    def files(version: int) -> dict[str, bytes]:
        out = io.BytesIO()
        seal_stream(
            io.BytesIO(good),
            out,
            keyring,
            model="chunked",
            version=version,
            filename=GGUF,
            chunk_size=4096,
        )
        return {GGUF + ".sealed": out.getvalue()}

    publish_version(repository / "chunked", files, version=1)
    authenticate_model(repository, "chunked", keyring)
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "chunked")
    client = grpcclient.InferenceServerClient(server.url)
    obs = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    try:
        served = _ask(client, "chunked", obs, ["logits"])["logits"]
    finally:
        client.close()

    local = GGUFPolicyBackend(spec_for(cartpole, "chunked"), good).run({"obs": obs}, ["logits"])[0]
    np.testing.assert_array_equal(served, local)


# ---- a malformed new version never replaces the live one --------------------------------------


def _missing_key(blob: bytes, tmp: Path) -> bytes:
    return rebuild(blob, tmp, drop_keys=(fmt.K_ACTOR_LAYERS,))


def _wrong_shape(blob: bytes, tmp: Path) -> bytes:
    return rebuild(blob, tmp, set_tensors={W0: (np.zeros((64, 3), np.float32), None)})


def _truncated(blob: bytes, tmp: Path) -> bytes:
    return blob[: len(blob) // 2]


@pytest.mark.parametrize(
    ("make_bad", "reason"),
    [
        (_missing_key, f"missing metadata key '{fmt.K_ACTOR_LAYERS}'"),
        (_wrong_shape, "expected a weight [out, 4]"),
        (_truncated, "truncated"),
    ],
    ids=["missing_key", "wrong_shape", "truncated"],
)
def test_malformed_new_version_is_refused_and_live_version_keeps_serving(
    make_bad: Callable[[bytes, Path], bytes],
    reason: str,
    good: bytes,
    cartpole: PolicyDescription,
    repository: Path,
    keyring: Keyring,
    tmp_path: Path,
    start_server,
) -> None:
    _publish(repository, keyring, "gpolicy", cartpole, "gguf", good)
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "gpolicy")
    client = grpcclient.InferenceServerClient(server.url)
    obs = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)
    try:
        before = _ask(client, "gpolicy", obs, ["logits"])["logits"]
        publish_sealed(
            repository, "gpolicy", make_bad(good, tmp_path), keyring, version=2, filename=GGUF
        )

        with pytest.raises(InferenceServerException) as excinfo:
            client.load_model("gpolicy")

        assert excinfo.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert reason in excinfo.value.message()
        index = client.get_model_repository_index(as_json=True)["models"]
        v2 = next(m for m in index if m["name"] == "gpolicy" and m.get("version") == "2")
        assert v2["state"] == "UNAVAILABLE" and reason in v2["reason"]
        assert client.is_model_ready("gpolicy", "1")
        np.testing.assert_array_equal(_ask(client, "gpolicy", obs, ["logits"])["logits"], before)
    finally:
        client.close()
