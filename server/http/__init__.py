"""The KServe v2 HTTP/REST front door, with Triton's extensions, beside gRPC."""
