"""How load generators connect: one real HTTP/2 connection per client."""

from __future__ import annotations

from tritonclient.grpc import KeepAliveOptions


def own_connection_options() -> list[tuple[str, int]]:
    """tritonclient's own default channel options, plus a local subchannel pool so that every
    client really has its own HTTP/2 connection (by default gRPC shares one connection between
    channels to the same target with the same options)."""
    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", 2**31 - 1),
        ("grpc.max_receive_message_length", 2**31 - 1),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.use_local_subchannel_pool", 1),
    ]
