"""ServiceConfig: every setting of a Tandem service, from one place.

Each setting comes, in rising precedence, from its default, a TOML file (`--config FILE` or
TANDEM_CONFIG; keys are the field names, optionally inside a table named after the role), the
environment (TANDEM_<FIELD>, e.g. TANDEM_ETCD=10.0.0.5:2379) and the command line
(--<field-with-dashes>). `tandem serve ROLE --help` lists them all with their help text, which is
the `help` metadata below; docs/configuration.md is that list.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import tomllib
import uuid
from dataclasses import dataclass, field
from typing import Any

ROLES = ("gateway", "tokenizer", "prefill", "decode")
WORKER_ROLES = ("prefill", "decode")
DEFAULT_GRPC_PORTS = {"gateway": 50050, "tokenizer": 50051, "prefill": 50052, "decode": 50053}
DEFAULT_METRICS_PORTS = {"gateway": 9400, "tokenizer": 9401, "prefill": 9402, "decode": 9403}
DEFAULT_HTTP_PORT = 8000  # the gateway's OpenAI-compatible HTTP API (vLLM's default port)
ENV_PREFIX = "TANDEM_"
_KINDS = {"int": int, "float": float, "str": str}


def _opt(default: Any, help: str, roles: tuple[str, ...] = ROLES):
    return field(default=default, metadata={"help": help, "roles": roles})


@dataclass
class ServiceConfig:
    role: str = _opt("decode", "the service to run: " + " | ".join(ROLES))
    # ---- network and cluster ------------------------------------------------------------------
    host: str = _opt("127.0.0.1", "address the gRPC server binds (0.0.0.0 in containers)")
    port: int = _opt(0, "gRPC port; 0 = the role's default (gateway 50050, tokenizer 50051, prefill 50052, decode 50053)")
    advertise_host: str = _opt("", "host other services use to reach this one; default: --host, or the hostname when binding 0.0.0.0")
    metrics_port: int = _opt(-1, "Prometheus /metrics port; -1 = the role's default (9400-9403), 0 = off")
    cluster: str = _opt("default", "cluster name: the etcd key prefix /tandem/<cluster>/")
    etcd: str = _opt("127.0.0.1:2379", "etcd endpoint host:port; https://host:port: TLS, with --tls-cert as the client certificate")
    lease_ttl: int = _opt(10, "etcd lease TTL in seconds: how long a dead service stays listed")
    worker_id: str = _opt("", "this process's id in etcd; default: <role>-<hostname>-<random>")
    drain_timeout: float = _opt(30.0, "seconds to let in-flight requests finish on SIGTERM")
    grpc_keepalive_time: float = _opt(
        10.0,
        "seconds between HTTP/2 keepalive pings on gRPC connections between services (the gateway's to the workers, and each server's to its clients): a peer silent for this plus --grpc-keepalive-timeout fails its calls with UNAVAILABLE instead of hanging; servers accept pings down to half this interval, so keep it equal on every service; 0 = no pings sent",
    )
    grpc_keepalive_timeout: float = _opt(5.0, "seconds a keepalive ping waits for its answer before the connection is closed")
    log_level: str = _opt("info", "debug | info | warning | error")
    tls_cert: str = _opt(
        "",
        "PEM certificate of this service (its role as DNS SAN tandem-<role>; `tandem certs` makes them); with tls_key and tls_ca: mTLS on every internal gRPC hop, TLS on the gateway's gRPC port and HTTPS on its OpenAI API; re-read when the file changes; empty = plaintext",
    )
    tls_key: str = _opt("", "PEM private key of --tls-cert (keep it mode 0600)")
    tls_ca: str = _opt("", "PEM CA certificate(s) that sign the cluster's certificates: the only issuer peers are trusted from")
    etcd_username: str = _opt(
        "",
        "etcd user to authenticate as, for an etcd with auth enabled (`tandem up --tls` makes one: tandem); its password comes from etcd_password_file or TANDEM_ETCD_PASSWORD; empty = no etcd authentication",
    )
    etcd_password_file: str = _opt(
        "",
        "file holding the etcd user's password (mode 0600, or a mounted secret); the TANDEM_ETCD_PASSWORD environment variable is the alternative. There is no password flag: argv is readable by every user",
    )
    # ---- the model (tokenizer and workers) --------------------------------------------------------
    model: str = _opt("default", "HF model directory, or 'default' (embedded SmolLM2-135M)", ("tokenizer", "prefill", "decode"))
    # ---- the engine (workers) -------------------------------------------------------------------
    dtype: str = _opt("auto", "auto | float32 | bfloat16", WORKER_ROLES)
    kv_cache_gb: float = _opt(1.0, "memory for the paged KV cache (GiB)", WORKER_ROLES)
    num_kv_blocks: int = _opt(0, "KV blocks; 0 = as many as --kv-cache-gb holds", WORKER_ROLES)
    block_size: int = _opt(16, "tokens per KV block (the prefix-cache granularity)", WORKER_ROLES)
    max_num_seqs: int = _opt(128, "sequences running at once", WORKER_ROLES)
    max_num_batched_tokens: int = _opt(2048, "token budget per engine step", WORKER_ROLES)
    max_model_len: int = _opt(0, "context length; 0 = the model's", WORKER_ROLES)
    threads: int = _opt(0, "torch threads; 0 = torch's default", WORKER_ROLES)
    # ---- KV transfer (disaggregation) ---------------------------------------------------------
    kv_lease_seconds: float = _opt(30.0, "prefill: how long a prefilled prompt's KV blocks wait for a decode worker to pull them", ("prefill",))
    kv_transfer_timeout: float = _opt(10.0, "decode: seconds a KV pull may take before it counts as failed", ("decode",))
    kv_transfer_policy: str = _opt("recompute", "decode: when a KV pull fails, recompute the prompt here (recompute) or fail the request (fail)", ("decode",))
    # ---- the gateway --------------------------------------------------------------------------
    routing_policy: str = _opt("prefix-aware", "how decode workers are chosen: prefix-aware | least-loaded | random | round-robin", ("gateway",))
    disagg_min_uncached_tokens: int = _opt(
        512, "AUTO mode: prefill on a prefill worker first when the chosen decode worker lacks at least this many prompt tokens in its cache; 0 = never", ("gateway",))  # fmt: skip
    scheduling_config: str = _opt(
        "",
        "a TOML file of scheduling weights and thresholds (see docs/architecture.md); the etcd key /tandem/<cluster>/config/scheduling overrides it live",
        ("gateway",),
    )
    max_prompt_tokens: int = _opt(
        0, "reject prompts longer than this many tokens; 0 = the decode workers' context length (max_model_len), which always applies", ("gateway",)
    )
    default_max_tokens: int = _opt(256, "max_tokens when a request leaves it unset", ("gateway",))
    http_port: int = _opt(
        DEFAULT_HTTP_PORT,
        "OpenAI-compatible HTTP API port on --host (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics); 0 = off",
        ("gateway",),
    )
    api_keys: str = _opt(
        "",
        "API keys clients must send as `Authorization: Bearer KEY` (gRPC metadata or HTTP header): @FILE with one a line, or comma-separated keys in the environment or config file (refused on the command line, where every user can read them); empty = no authentication",
        ("gateway",),
    )
    max_requests_in_flight: int = _opt(
        256, "refuse requests beyond this many in flight at this gateway (gRPC RESOURCE_EXHAUSTED, HTTP 429); 0 = no limit", ("gateway",)
    )
    # ---- input limits (see docs/architecture.md, "Limits"): each refusal is INVALID_ARGUMENT / 400 naming the field
    http_max_body_bytes: int = _opt(4 << 20, "largest OpenAI HTTP request body in bytes (HTTP 413 beyond it)", ("gateway",))
    max_prompt_chars: int = _opt(
        1_000_000, "largest text prompt, and largest total of a chat's message contents, in characters; checked before tokenizing", ("gateway", "tokenizer")
    )
    max_chat_messages: int = _opt(1024, "most messages in one chat request; checked before the chat template runs", ("gateway", "tokenizer"))
    max_stop_strings: int = _opt(16, "most stop strings per request (the workers allow at most 64)", ("gateway",))
    max_stop_string_chars: int = _opt(256, "longest stop string in characters (the workers allow at most 1024)", ("gateway",))
    max_stop_token_ids: int = _opt(256, "most stop token ids per request (the workers allow at most 1024)", ("gateway",))
    max_cache_salt_chars: int = _opt(256, "longest cache_salt in characters (the workers allow at most 1024)", ("gateway",))
    health_requires_tokenizer: int = _opt(
        1,
        "1: the HTTP GET /health readiness answers 503 while no tokenizer is registered; 0: a decode worker suffices (clusters serving token-id prompts only)",
        ("gateway",),
    )
    tokenizer_threads: int = _opt(2, "threads that tokenize and render chat templates off the event loop; further requests queue for them", ("tokenizer",))
    # ---- the gateway: worker failures (outlier detection, retries, migration) -----------------
    outlier_consecutive_failures: int = _opt(
        3,
        "eject a worker from routing after this many of its calls in a row fail with UNAVAILABLE, INTERNAL, UNKNOWN or DATA_LOSS; 0 = no outlier detection",
        ("gateway",),
    )
    outlier_base_ejection_seconds: float = _opt(5.0, "first ejection's length; the n-th ejection lasts n times as long (up to the max)", ("gateway",))
    outlier_max_ejection_seconds: float = _opt(
        60.0, "longest ejection; a worker that served well this long after its last ejection starts over from the base", ("gateway",)
    )
    outlier_max_ejection_percent: int = _opt(
        50, "at most this percent of a role's workers ejected at once (at least one, never all); 0 = never eject", ("gateway",)
    )
    decode_streams: str = _opt(
        "shared",
        "how the gateway streams from a decode worker: shared (one GenerateMany stream per worker, one message per engine step for all its requests) | per-request (a Generate call each)",
        ("gateway",),
    )
    max_migrations: int = _opt(
        2, "times one request may move to another decode worker when its worker fails mid-stream (then UNAVAILABLE); 0 = never", ("gateway",)
    )

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not self.port:
            self.port = DEFAULT_GRPC_PORTS[self.role]
        if self.metrics_port < 0:
            self.metrics_port = DEFAULT_METRICS_PORTS[self.role]
        if not self.advertise_host:
            self.advertise_host = socket.gethostname() if self.host in ("0.0.0.0", "::", "[::]") else self.host
        if not self.worker_id:
            self.worker_id = f"{self.role}-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        if self.lease_ttl < 2:
            raise ValueError(f"lease_ttl must be >= 2 seconds (the keep-alive runs every ttl/3), got {self.lease_ttl}")
        if self.routing_policy not in ("least-loaded", "prefix-aware", "random", "round-robin"):
            raise ValueError(f"routing_policy must be least-loaded, prefix-aware, random or round-robin, got {self.routing_policy!r}")
        if self.kv_transfer_policy not in ("recompute", "fail"):
            raise ValueError(f"kv_transfer_policy must be recompute or fail, got {self.kv_transfer_policy!r}")
        if self.kv_lease_seconds <= 0 or self.kv_transfer_timeout <= 0:
            raise ValueError("kv_lease_seconds and kv_transfer_timeout must be > 0")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [0, 65535] (0 = off), got {self.http_port}")
        for name in ("http_max_body_bytes", "max_prompt_chars", "max_chat_messages", "max_stop_strings", "max_stop_string_chars",
                     "max_stop_token_ids", "max_cache_salt_chars", "tokenizer_threads"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.health_requires_tokenizer not in (0, 1):
            raise ValueError(f"health_requires_tokenizer must be 0 or 1, got {self.health_requires_tokenizer}")
        if self.max_requests_in_flight < 0:
            raise ValueError(f"max_requests_in_flight must be >= 0 (0 = no limit), got {self.max_requests_in_flight}")
        if self.decode_streams not in ("shared", "per-request"):
            raise ValueError(f"decode_streams must be shared or per-request, got {self.decode_streams!r}")
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations must be >= 0 (0 = never migrate), got {self.max_migrations}")
        if self.grpc_keepalive_time != 0 and self.grpc_keepalive_time < 1:
            raise ValueError(f"grpc_keepalive_time must be >= 1 second (0 = no pings), got {self.grpc_keepalive_time}")
        if self.grpc_keepalive_timeout <= 0:
            raise ValueError(f"grpc_keepalive_timeout must be > 0 seconds, got {self.grpc_keepalive_timeout}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        tls = {"tls_cert": self.tls_cert, "tls_key": self.tls_key, "tls_ca": self.tls_ca}
        if any(tls.values()) and not all(tls.values()):
            raise ValueError(f"TLS needs tls_cert, tls_key and tls_ca together; {', '.join(n for n, v in tls.items() if not v)} not set")
        for name, path in tls.items():
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{name}: cannot read {path!r}")
        if "/" in self.cluster or not self.cluster:
            raise ValueError(f"cluster must be a non-empty name without '/', got {self.cluster!r}")

    @property
    def address(self) -> str:
        """host:port others dial."""
        return f"{self.advertise_host}:{self.port}"

    @property
    def bind_address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        return f"{self.advertise_host}:{self.metrics_port}" if self.metrics_port else ""


def _fields_for(role: str | None) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(ServiceConfig) if f.name != "role" and (role is None or role in f.metadata["roles"])]


def add_config_args(parser: argparse.ArgumentParser, role: str | None) -> None:
    """Add --<field> for every setting of `role` (all roles when None). Defaults stay None so that
    load_config can tell a flag the user gave from one they did not."""
    parser.add_argument("--config", default=None, help="TOML file of settings (also TANDEM_CONFIG)")
    for f in _fields_for(role):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=_KINDS[f.type],
            default=None,
            help=f"{f.metadata['help']} (default {f.default!r}; env {ENV_PREFIX}{f.name.upper()})",
        )
    if role is None or "etcd_password_file" in {f.name for f in _fields_for(role)}:
        # exists only to be refused: argparse would otherwise take --etcd-password as an
        # abbreviation of --etcd-password-file and echo the password back as a file name
        parser.add_argument("--etcd-password", dest="etcd_password_on_argv", default=None, help=argparse.SUPPRESS)


def load_config(role: str, args: argparse.Namespace | None = None, environ: dict[str, str] | None = None) -> ServiceConfig:
    """Merge defaults < TOML file < environment < flags into a ServiceConfig. Raises ValueError naming a bad setting."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    known = {f.name: f for f in _fields_for(role)}
    if path:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        tables = [k for k, v in data.items() if isinstance(v, dict)]
        for table in tables:
            if table not in ROLES:
                raise ValueError(f"{path}: unknown table [{table}]; tables name a role: {', '.join(ROLES)}")
        data = {**{k: v for k, v in data.items() if not isinstance(v, dict)}, **data.get(role, {})}
        for key, value in data.items():
            if key not in {f.name for f in _fields_for(None)}:
                raise ValueError(f"{path}: unknown setting {key!r}")
            if key in known:
                values[key] = value
    for name, f in known.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _parse(f, raw, f"environment variable {ENV_PREFIX}{name.upper()}")
    for name in known:
        value = getattr(args, name, None) if args is not None else None
        if value is not None:
            values[name] = value
    _refuse_secrets_on_argv(getattr(args, "api_keys", None) if args is not None else None)
    if getattr(args, "etcd_password_on_argv", None) is not None:
        raise ValueError("--etcd-password: a password on the command line is visible to every user of the machine (ps, /proc); "
                         "use --etcd-password-file FILE (mode 0600) or the TANDEM_ETCD_PASSWORD environment variable")  # fmt: skip
    for name, value in values.items():
        values[name] = _parse(known[name], value, f"setting {name}")
    return ServiceConfig(role=role, **values)


def _refuse_secrets_on_argv(api_keys_flag: str | None) -> None:
    """A key on the command line is readable by every user of the host (ps, /proc/PID/cmdline) and
    lands in shell history and orchestrator specs: only a file reference is accepted there."""
    if api_keys_flag is not None and api_keys_flag.strip() and not api_keys_flag.strip().startswith("@"):
        raise ValueError("--api-keys: keys on the command line are visible to every user of the machine (ps, /proc); "
                         "use --api-keys @FILE (one key a line, mode 0600), the TANDEM_API_KEYS environment variable, "
                         "or api_keys in the --config file")  # fmt: skip


def _parse(f: dataclasses.Field, value: Any, where: str) -> Any:
    kind = _KINDS[f.type]
    if isinstance(value, bool):  # TOML true/false: never a number or a name
        raise ValueError(f"{where} must be {f.type}, got {value!r}")
    if isinstance(value, kind):
        return value
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{where} must be an integer, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be {f.type}, got {value!r}") from None


def settings_markdown() -> str:
    """The settings table of docs/configuration.md (a test keeps the two equal)."""
    lines = ["| setting | flag | environment | default | roles | meaning |", "|---|---|---|---|---|---|"]
    for f in _fields_for(None):
        roles = "all" if f.metadata["roles"] == ROLES else ", ".join(f.metadata["roles"])
        flag, env = "--" + f.name.replace("_", "-"), ENV_PREFIX + f.name.upper()
        lines.append(f"| `{f.name}` | `{flag}` | `{env}` | `{f.default!r}` | {roles} | {f.metadata['help'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"
