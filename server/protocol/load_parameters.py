"""RepositoryModelLoad's parameters (Triton's repository extension) read into
`LoadParameters`: "config" (a string: the config override as JSON) and "file:<path>" (bytes:
file overrides). Any other key is refused, naming it."""

from __future__ import annotations

from collections.abc import Mapping

from tritonclient.grpc import service_pb2 as pb

from forseti.core.errors import InvalidArgument, shown
from forseti.server.model_control import LoadParameters


def load_parameters(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> LoadParameters:
    """The load's parameters, type-checked."""
    config: str | None = None
    files: dict[str, bytes] = {}
    for key, p in parameters.items():
        which = p.WhichOneof("parameter_choice")
        if key == "config":
            if which != "string_param":
                raise InvalidArgument("load parameter 'config' must be a string (JSON)")
            config = p.string_param
        elif key.startswith("file:"):
            if which != "bytes_param":
                raise InvalidArgument(f"load parameter '{shown(key)}' must be bytes")
            files[key.removeprefix("file:")] = p.bytes_param
        else:
            raise InvalidArgument(
                f"unknown load parameter '{shown(key)}'; Triton's are 'config' and 'file:<path>'"
            )
    return LoadParameters(config_json=config, files=files)
