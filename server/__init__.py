"""The gRPC inference server: protocol, repository, backends, registry, security, metrics."""
