"""HTTP/2 keepalive on every gRPC connection between Tandem services: a silent peer fails fast.

A peer that goes silent without closing its connection (a cut cable, a partitioned host, a frozen
VM) leaves the calls on that connection waiting for TCP's retransmission timeout (15 minutes and
more) or the client's deadline. With keepalive the client pings every `time_s`; a ping not
answered within `timeout_s` closes the connection, its calls end with UNAVAILABLE, and the
gateway's retries and migration (gateway/decode_leg.py) take over.

    client (channel_options)   ping every time_s, also with no call open and no data flowing
                               (grpc core stops after 2 pings without data unless
                               http2.max_pings_without_data is 0; it never pings more often
                               than once a second, whatever keepalive_time says)
    server (server_options)    accept those pings: grpc's default policy allows one ping per 5
                               minutes on a connection that sends no data, and answers a client
                               that pings faster with GOAWAY "too_many_pings" (after
                               max_ping_strikes); it also pings its clients on the same schedule,
                               so a worker notices a gateway that vanished and aborts its calls
                               (freeing their KV blocks)

Servers accept pings down to half the configured interval, so a client a little faster than
the server's own setting (or a timer firing early) is not struck; keep the setting equal on
every service. 10 s / 5 s is the detection budget of gRPC-Go's and Envoy's usual settings for
east-west traffic: a partition is noticed within 15 s, the cost is one ping per connection per
10 s of silence.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TIME_S = 10.0
DEFAULT_TIMEOUT_S = 5.0
# grpc's own default: a client that pings faster than allowed gets this many strikes, then GOAWAY;
# kept so a misbehaving client cannot flood a server with pings
MAX_PING_STRIKES = 2


@dataclass(frozen=True)
class Keepalive:
    time_s: float = DEFAULT_TIME_S  # 0: clients send no keepalive pings (servers still accept them)
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        if self.time_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"keepalive time must be >= 0 (0 = off) and timeout > 0, got {self.time_s} and {self.timeout_s}")

    @classmethod
    def from_config(cls, config) -> Keepalive:
        return cls(config.grpc_keepalive_time, config.grpc_keepalive_timeout)

    @property
    def min_recv_interval_s(self) -> float:
        """The shortest interval between pings a server accepts (see the module docstring)."""
        return (self.time_s or DEFAULT_TIME_S) / 2

    def channel_options(self) -> list[tuple[str, int]]:
        """Options for a client channel (grpc.aio.insecure_channel / secure_channel)."""
        if not self.time_s:
            return []
        return [
            ("grpc.keepalive_time_ms", _ms(self.time_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.timeout_s)),
            # grpc core 1.85 waits for a keepalive ping's ack this long (default 60 s), not
            # keepalive_timeout: without it a silent peer is noticed a minute late (measured)
            ("grpc.http2.ping_timeout_ms", _ms(self.timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def server_options(self) -> list[tuple[str, int]]:
        """Options for a grpc.aio.server: accept the clients' pings, and ping the clients."""
        accept = [
            # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS (the macro's name, not its string)
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.min_recv_interval_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ]
        if not self.time_s:
            return accept
        return [*accept, ("grpc.keepalive_time_ms", _ms(self.time_s)), ("grpc.keepalive_timeout_ms", _ms(self.timeout_s)),
                ("grpc.http2.ping_timeout_ms", _ms(self.timeout_s)), ("grpc.http2.max_pings_without_data", 0)]  # fmt: skip


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
