"""Training specs: a valid TOML spec loads; each kind of mistake is refused naming its field."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from forseti.trainer_sidecar import spec as spec_module
from forseti.trainer_sidecar.spec import (
    AlgorithmSpec,
    CheckpointSpec,
    EnvSpec,
    EvaluationSpec,
    PublishedModelSpec,
    ServerSpec,
    SidecarSpec,
    SpecError,
    load_spec,
    spec_from_dict,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cartpole_ppo.toml"

MINIMAL = """
[model]
name = "cartpole"
repository = "repo"

[env]
id = "CartPole-v1"
n_envs = 2

[algorithm]
name = "PPO"
total_timesteps = 1024

[algorithm.hyperparameters]
n_steps = 64
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def error_field(tmp_path: Path, text: str) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    return info.value.field_name


def test_example_spec_loads_with_paths_relative_to_the_spec_file() -> None:
    spec = load_spec(EXAMPLE)
    assert spec.algorithm.name == "PPO"
    assert spec.model.repository == EXAMPLE.parent / "../model_repository"
    assert spec.rollout_timesteps == 32 * 8


def test_minimal_spec_fills_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL))
    assert spec.checkpoint.interval_timesteps == 1024
    assert spec.evaluation.episodes == 10
    assert spec.model.formats == ("onnx",)
    assert spec.model.repository == tmp_path / "repo"


def test_left_out_fields_take_the_dataclass_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL))
    assert spec.model == PublishedModelSpec(name="cartpole", repository=tmp_path / "repo")
    assert spec.env == EnvSpec(id="CartPole-v1", n_envs=2)
    assert spec.algorithm == AlgorithmSpec(
        name="PPO", total_timesteps=1024, hyperparameters={"n_steps": 64}
    )
    # Derived defaults: the run dir beside the spec, one checkpoint at the end.
    assert spec.checkpoint == CheckpointSpec(
        directory=tmp_path / "runs" / "cartpole", interval_timesteps=1024
    )
    assert spec.evaluation == EvaluationSpec()
    assert spec.server == ServerSpec(keyring=tmp_path / "keyring.json")
    assert spec.sidecar == SidecarSpec()


def test_every_spec_field_has_a_docstring() -> None:
    """Specs document themselves: each section field is followed by its docstring."""
    tree = ast.parse(Path(spec_module.__file__).read_text(encoding="utf-8"))
    sections = {cls.__name__ for cls in (PublishedModelSpec, EnvSpec, AlgorithmSpec,
                CheckpointSpec, EvaluationSpec, ServerSpec, SidecarSpec)}  # fmt: skip
    undocumented = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in sections:
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    after = body[i + 1] if i + 1 < len(body) else None
                    documented = isinstance(after, ast.Expr) and isinstance(
                        after.value, ast.Constant
                    )
                    if not documented:
                        undocumented.append(f"{node.name}.{stmt.target.id}")
            sections.discard(node.name)
    assert not sections, f"section classes not found: {sections}"
    assert not undocumented


def test_missing_required_field_is_named(tmp_path: Path) -> None:
    assert error_field(tmp_path, MINIMAL.replace('name = "cartpole"\n', "")) == "model.name"


def test_unknown_field_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace("n_envs = 2", "n_envs = 2\nnenvs = 3")
    assert error_field(tmp_path, text) == "env.nenvs"


def test_unregistered_env_id_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("CartPole-v1", "NoSuchEnv-v9")
    assert error_field(tmp_path, text) == "env.id"


def test_unknown_algorithm_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace('name = "PPO"', 'name = "TRPO"')
    assert error_field(tmp_path, text) == "algorithm.name"


def test_hyperparameter_the_algorithm_lacks_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace("n_steps = 64", "n_steps = 64\nbuffer_size = 10")
    assert error_field(tmp_path, text) == "algorithm.hyperparameters.buffer_size"


def test_bad_linear_schedule_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace("n_steps = 64", 'n_steps = 64\nlearning_rate = "lin_fast"')
    assert error_field(tmp_path, text) == "algorithm.hyperparameters.learning_rate"


def test_too_many_envs_are_refused(tmp_path: Path) -> None:
    assert error_field(tmp_path, MINIMAL.replace("n_envs = 2", "n_envs = 33")) == "env.n_envs"


def test_flag_written_as_number_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("n_envs = 2", "n_envs = 2\nnormalize_observations = 1")
    assert error_field(tmp_path, text) == "env.normalize_observations"


def test_total_off_the_rollout_size_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="use 1152") as info:
        load_spec(write(tmp_path, MINIMAL.replace("1024", "1100")))
    assert info.value.field_name == "algorithm.total_timesteps"


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    assert error_field(tmp_path, "[model\n") == "file"


def test_spec_hash_ignores_run_length_but_not_hyperparameters(tmp_path: Path) -> None:
    base = load_spec(write(tmp_path, MINIMAL)).spec_hash
    longer = load_spec(write(tmp_path, MINIMAL.replace("1024", "2048"))).spec_hash
    other = load_spec(write(tmp_path, MINIMAL.replace("n_steps = 64", "n_steps = 128"))).spec_hash
    assert base == longer
    assert base != other


def test_spec_from_dict_rebuilds_the_spec_to_dict_wrote(tmp_path: Path) -> None:
    text = (
        MINIMAL.replace("n_envs = 2", "n_envs = 2\nnormalize_observations = true").replace(
            "total_timesteps = 1024", "total_timesteps = 1024\nnet_arch = [32, 16]"
        )
        + '\n[server]\naudit_log = "audit.log"\n'
    )
    spec = load_spec(write(tmp_path, text))
    rebuilt = spec_from_dict(json.loads(json.dumps(spec.to_dict())))
    assert rebuilt == spec
    assert rebuilt.algorithm.net_arch == (32, 16)
    assert rebuilt.model.formats == ("onnx",)
    assert isinstance(rebuilt.checkpoint.directory, Path)
    assert rebuilt.server.audit_log == tmp_path / "audit.log"
    assert rebuilt.server.token_file is None
    assert rebuilt.spec_hash == spec.spec_hash
    assert rebuilt.run_name == "cartpole-ppo"


def test_spec_from_dict_names_an_unknown_field(tmp_path: Path) -> None:
    data = load_spec(write(tmp_path, MINIMAL)).to_dict()
    data["env"]["frame_skip"] = 4
    with pytest.raises(SpecError) as info:
        spec_from_dict(data)
    assert info.value.field_name == "env.frame_skip"


def test_spec_from_dict_names_a_missing_required_field(tmp_path: Path) -> None:
    data = load_spec(write(tmp_path, MINIMAL)).to_dict()
    del data["env"]["id"]
    with pytest.raises(SpecError) as info:
        spec_from_dict(data)
    assert info.value.field_name == "env.id"


def test_repository_and_checkpoint_directory_may_be_object_store_urls(tmp_path: Path) -> None:
    text = MINIMAL.replace('repository = "repo"', 'repository = "s3://host:9000/bucket/models"')
    text += '\n[checkpoint]\ndirectory = "s3://bucket/runs/cartpole"\n'
    spec = load_spec(write(tmp_path, text))
    assert spec.model.repository == "s3://host:9000/bucket/models"
    assert spec.checkpoint.directory == "s3://bucket/runs/cartpole"
    assert spec_from_dict(spec.to_dict()) == spec
