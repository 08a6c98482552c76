"""Builds the test repository's models as real ONNX graphs and publishes them sealed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from forseti.core.repository.manifest import commit_manifest, file_hashes, sha256_hex, with_version
from forseti.core.repository.publish import publish_model_version, publish_version
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.seal_repository import write_model_manifest
from forseti.core.sealing.sealed import seal_bytes
from forseti.core.storage import open_storage

OBS_DIM = 8
N_ACTIONS = 4

POLICY_CONFIG = """
name: "policy"
backend: "onnxruntime"
max_batch_size: 64
input [ { name: "obs" data_type: TYPE_FP32 dims: [ 8 ] } ]
output [
  { name: "action" data_type: TYPE_INT64 dims: [ 1 ] },
  { name: "logits" data_type: TYPE_FP32 dims: [ 4 ] }
]
parameters { key: "env_id" value: { string_value: "Test-v0" } }
"""

SIMPLE_CONFIG = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
"""

# Every numeric type Triton and onnxruntime share, as (Triton name, config type, onnx type).
ALL_TYPES = [
    ("BOOL", "TYPE_BOOL", TensorProto.BOOL),
    ("UINT8", "TYPE_UINT8", TensorProto.UINT8),
    ("UINT16", "TYPE_UINT16", TensorProto.UINT16),
    ("UINT32", "TYPE_UINT32", TensorProto.UINT32),
    ("UINT64", "TYPE_UINT64", TensorProto.UINT64),
    ("INT8", "TYPE_INT8", TensorProto.INT8),
    ("INT16", "TYPE_INT16", TensorProto.INT16),
    ("INT32", "TYPE_INT32", TensorProto.INT32),
    ("INT64", "TYPE_INT64", TensorProto.INT64),
    ("FP16", "TYPE_FP16", TensorProto.FLOAT16),
    ("FP32", "TYPE_FP32", TensorProto.FLOAT),
    ("FP64", "TYPE_FP64", TensorProto.DOUBLE),
]


def onnx_model_bytes(graph: onnx.GraphProto) -> bytes:
    """The checked ONNX model (opset 17, IR 8) of `graph`, serialised."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def policy_onnx(tag: int, hidden: int = 32, obs_dim: int = OBS_DIM) -> bytes:
    """An MLP policy obs[-1,8] -> logits[-1,4], action[-1,1]. The bias makes action == tag % 4
    for observations in [-1, 1], so a test can tell versions apart by their answers."""
    rng = np.random.default_rng(tag)
    w1 = rng.standard_normal((obs_dim, hidden)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((hidden, N_ACTIONS)).astype(np.float32) * 0.1
    b2 = np.zeros(N_ACTIONS, np.float32)
    b2[tag % N_ACTIONS] = 100.0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["obs", "w1"], ["h"]),
            helper.make_node("Tanh", ["h"], ["ht"]),
            helper.make_node("MatMul", ["ht", "w2"], ["z"]),
            helper.make_node("Add", ["z", "b2"], ["logits"]),
            helper.make_node("ArgMax", ["logits"], ["action"], axis=1, keepdims=1),
        ],
        "policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", obs_dim])],
        [
            helper.make_tensor_value_info("action", TensorProto.INT64, ["batch", 1]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", N_ACTIONS]),
        ],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    return onnx_model_bytes(graph)


def simple_onnx() -> bytes:
    """Triton's `simple` example: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    shape: list[str | int] = ["batch", 16]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "simple",
        [
            helper.make_tensor_value_info("INPUT0", TensorProto.INT32, shape),
            helper.make_tensor_value_info("INPUT1", TensorProto.INT32, shape),
        ],
        [
            helper.make_tensor_value_info("OUTPUT0", TensorProto.INT32, shape),
            helper.make_tensor_value_info("OUTPUT1", TensorProto.INT32, shape),
        ],
    )
    return onnx_model_bytes(graph)


def all_types_onnx() -> bytes:
    """Identity for one input per numeric type: IN_<T> -> OUT_<T>, shape [-1, 3]."""
    nodes, inputs, outputs = [], [], []
    for name, _, onnx_type in ALL_TYPES:
        nodes.append(helper.make_node("Identity", [f"IN_{name}"], [f"OUT_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"IN_{name}", onnx_type, ["batch", 3]))
        outputs.append(helper.make_tensor_value_info(f"OUT_{name}", onnx_type, ["batch", 3]))
    return onnx_model_bytes(helper.make_graph(nodes, "all_types", inputs, outputs))


def all_types_config() -> str:
    ins = ", ".join(f'{{ name: "IN_{n}" data_type: {t} dims: [ 3 ] }}' for n, t, _ in ALL_TYPES)
    outs = ", ".join(f'{{ name: "OUT_{n}" data_type: {t} dims: [ 3 ] }}' for n, t, _ in ALL_TYPES)
    return (
        f'name: "all_types"\nbackend: "onnxruntime"\nmax_batch_size: 4\n'
        f"input [ {ins} ]\noutput [ {outs} ]\n"
    )


def write_config(repo: Path, name: str, config_text: str) -> Path:
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config_text)
    return model_dir


def publish_sealed(
    repo: Path,
    name: str,
    model: bytes,
    keyring: Keyring,
    version: int | None = None,
    filename: str = "model.onnx",
    manifest_keyring: Keyring | None = None,
) -> int:
    """Seal `model` for the version being claimed, publish it atomically and commit it in the
    model's manifest, authenticating the config.pbtxt found there (as the operator holding
    the key would with `forseti publish`). `manifest_keyring`, when given, commits the
    manifest with another keyring than the one that seals (an artifact sealed with a key the
    server lacks, in a manifest it trusts)."""

    def files(number: int) -> dict[str, bytes]:
        blob = seal_bytes(model, keyring, model=name, version=number, filename=filename)
        return {filename + ".sealed": blob}

    config = repo / name / "config.pbtxt"
    if manifest_keyring is not None:
        number = publish_version(repo / name, files, version=version)
        config_sha = sha256_hex(config.read_bytes())
        commit_manifest(
            open_storage(repo),
            name,
            manifest_keyring,
            lambda m: with_version(
                m, name, config_sha, number, file_hashes({filename: model}), "test"
            ),
        )
        return number
    if not config.is_file():
        # No config to authenticate (a test of the folder layout alone): publish the files.
        return publish_version(repo / name, files, version=version)
    published = publish_model_version(
        open_storage(repo),
        name,
        {filename: model},
        keyring=keyring,
        adopt_config=True,
        version=version,
    )
    return published.version


def commit_version(
    repo: Path, name: str, version: int, keyring: Keyring, plaintext: dict[str, bytes]
) -> int:
    """Commit `version` in `name`'s manifest as if `plaintext` had been published there,
    without touching the version folder (for tests that put a faulty folder there by hand);
    returns the manifest's serial."""
    config_sha = sha256_hex((repo / name / "config.pbtxt").read_bytes())
    hashes = file_hashes(plaintext)
    return commit_manifest(
        open_storage(repo),
        name,
        keyring,
        lambda m: with_version(m, name, config_sha, version, hashes, "test"),
    ).serial


def authenticate_model(repo: Path, name: str, keyring: Keyring) -> int:
    """Write `name`'s manifest from what its folder holds now (what `forseti seal` does for
    every model); returns the manifest's serial. For tests that edit a model by hand."""
    return write_model_manifest(open_storage(repo), name, keyring, reason="test").serial


def build_repository(repo: Path, keyring: Keyring) -> None:
    """The standard test repository: policy v1, simple v1, all_types v1, all sealed."""
    write_config(repo, "policy", POLICY_CONFIG)
    publish_sealed(repo, "policy", policy_onnx(1), keyring, version=1)
    write_config(repo, "simple", SIMPLE_CONFIG)
    publish_sealed(repo, "simple", simple_onnx(), keyring, version=1)
    write_config(repo, "all_types", all_types_config())
    publish_sealed(repo, "all_types", all_types_onnx(), keyring, version=1)
