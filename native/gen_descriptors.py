"""Write the KServe v2 / Triton service definitions, as a FileDescriptorSet, from the
descriptors that the installed tritonclient package ships (service_pb2, model_config_pb2).

protoc reads the set with --descriptor_set_in and generates the C++ message classes, so the
native data plane speaks exactly the protocol the Python side parses, with no .proto files
kept in this repository."""

from __future__ import annotations

import sys

from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2


def main(out: str) -> None:
    files = descriptor_pb2.FileDescriptorSet()
    for module in (model_config_pb2, service_pb2):  # dependencies first
        proto = files.file.add()
        module.DESCRIPTOR.CopyToProto(proto)
    with open(out, "wb") as f:
        f.write(files.SerializeToString())


if __name__ == "__main__":
    main(sys.argv[1])
