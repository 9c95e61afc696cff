"""The `tandem` command line: one entry point for every part of Tandem.

tandem up [--ask PROMPT]        the whole system locally (etcd + every service as processes)
tandem serve ROLE               one service: gateway | tokenizer | prefill | decode
tandem generate "prompt"        stream a generation from the gateway (--chat: as a user message)
tandem bench WORKLOAD           load-test the gateway (or one worker): TTFT, TPOT, ITL, throughput
tandem health HOST:PORT         grpc.health.v1 Check (container healthchecks)
tandem model prepare            convert the embedded SmolLM2 default into its cached HF directory
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def cmd_model_prepare(args) -> int:
    from services.model_files.default_model import prepare_default_model

    t = time.perf_counter()
    path = prepare_default_model(force=args.force)
    print(f"default model ready at {path} ({time.perf_counter() - t:.1f}s)")
    return 0


def cmd_serve(args) -> int:
    from services.common.config import load_config
    from services.common.server import run

    config = load_config(args.role, args)
    if args.role == "gateway":
        from gateway.service import GatewayService as Service
    elif args.role == "tokenizer":
        from services.tokenizer.service import TokenizerService as Service
    elif args.role == "prefill":
        from services.prefill.service import PrefillService as Service
    else:
        from services.decode.service import DecodeService as Service
    run(config, Service(config))
    return 0


def cmd_health(args) -> int:
    from .health import check_health

    ok = check_health(args.address, args.service, args.timeout, tls_dir=args.tls_dir, role=args.role)
    print("SERVING" if ok else "NOT SERVING", file=sys.stderr)
    return 0 if ok else 1


def print_stream(address: str, request, timeout: float | None, api_key: str | None = None, tls_ca: str | None = None) -> int:
    """Stream one generation to stdout; the summary line goes to stderr."""
    import grpc

    from .client import FINISH_NAMES, stream_generate

    t = time.perf_counter()
    ttft = None
    try:
        for chunk in stream_generate(address, request, timeout, api_key, tls_ca):
            if ttft is None and chunk.token_ids:
                ttft = time.perf_counter() - t
            print(chunk.text, end="", flush=True)
            if chunk.finish_reason:
                u = chunk.usage
                print()
                print(
                    f"[{u.completion_tokens} tokens in {time.perf_counter() - t:.2f}s, first after {ttft or 0:.2f}s; "
                    f"prompt {u.prompt_tokens} tokens ({u.cached_prompt_tokens} cached); finish_reason={FINISH_NAMES[chunk.finish_reason]}]",
                    file=sys.stderr,
                )
    except grpc.RpcError as e:
        print(f"\ntandem: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def cmd_generate(args) -> int:
    from .client import build_request

    request = build_request(args.prompt, args.chat, args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed, args.stop, args.mode)
    return print_stream(args.gateway, request, args.timeout, args.api_key, args.tls_ca)


def cmd_bench(args) -> int:
    from loadtest.bench_cli import run

    return run(args, sys.argv[2:] if sys.argv[1:2] == ["bench"] else None)


# Below this many cores `tandem up` runs no prefill worker. Measured on 2 cores (bf16, 64 × 256-token
# prompts → 128 tokens at once, same run, docs/benchmarks.md): one aggregated worker on both cores
# served 504 tok/s, two aggregated workers 515, one prefill + one decode worker of one core each 324:
# the split halves the cores that the decode batch can use while the prefill worker idles between
# bursts. The split pays where prefill and decode each get cores of their own.
SPLIT_MIN_CORES = 8


def default_prefill_workers(cores: int) -> int:
    return 1 if cores >= SPLIT_MIN_CORES else 0


def cmd_up(args) -> int:
    import logging
    import signal
    import threading

    from .client import build_request
    from .launcher import ClusterSpec, LocalCluster
    from .supervisor import RestartPolicy

    if args.max_restarts < 0:
        raise ValueError(f"--max-restarts must be >= 0 (0 = never restart), got {args.max_restarts}")
    # the workers share this machine's cores: torch's default (every core per process) makes their
    # OpenMP threads spin against each other, which made model loading 10x slower on 2 cores
    if args.prefill is None:
        args.prefill = default_prefill_workers(os.cpu_count() or 1)
    threads = args.threads or max(1, (os.cpu_count() or 1) // (args.prefill + args.decode))
    worker_args = ["--kv-cache-gb", str(args.kv_cache_gb), "--dtype", args.dtype, "--threads", str(threads)]
    spec = ClusterSpec(
        model=args.model, num_prefill=args.prefill, num_decode=args.decode, cluster=args.cluster,
        etcd=args.etcd, base_port=args.base_port, worker_args=worker_args,
        role_args={"gateway": ["--disagg-min-uncached-tokens", str(args.disagg_min_uncached_tokens), "--routing-policy", args.routing_policy,
                               *(["--scheduling-config", os.path.abspath(args.scheduling_config)] if args.scheduling_config else [])]},
        workdir=Path(args.workdir) if args.workdir else None, http_port=args.http_port,
        restart=True, restart_policy=RestartPolicy(max_restarts=args.max_restarts), tls=args.tls,
    )  # fmt: skip
    # supervision: a service that exits is restarted (its count shown here and in its log); the
    # events are printed below, so the logger's fallback must not print them a second time
    logging.getLogger("tandem.supervisor").addHandler(logging.NullHandler())
    cluster = LocalCluster(spec, on_event=lambda e: print(f"tandem: {e.message}", file=sys.stderr, flush=True))
    print(f"starting Tandem (logs in {cluster.workdir}) ...", file=sys.stderr)
    t = time.perf_counter()

    def interrupt(*_):
        raise KeyboardInterrupt

    # while starting, SIGTERM acts like Ctrl-C: start() stops what it had started, then we exit
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            cluster.start()
        except (RuntimeError, TimeoutError) as e:  # etcd missing, a service that failed to start
            print(f"tandem: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("tandem: interrupted while starting", file=sys.stderr)
            return 130
        http = f", OpenAI-compatible HTTP API at {cluster.gateway_http_url}" if cluster.gateway_http_url else ""
        print(f"Tandem is up in {time.perf_counter() - t:.1f}s: gateway at {cluster.gateway_address} (gRPC){http}", file=sys.stderr)
        certs_dir = cluster.workdir / "certs"
        etcd_tls = f" --tls-cert {certs_dir}/client.pem --tls-key {certs_dir}/client-key.pem --tls-ca {certs_dir}/ca.pem" if args.tls else ""
        if cluster.etcd_auth is not None:  # our etcd's auth is on: its user and the password's file
            etcd_tls += f" --etcd-username {cluster.etcd_auth.username} --etcd-password-file {cluster.etcd_auth.password_file}"
        print(f"  etcd at {cluster.etcd_endpoint} (cluster {args.cluster}): `tandem scheduling --etcd {cluster.etcd_endpoint}{etcd_tls} show`", file=sys.stderr)
        # from here Ctrl-C/SIGTERM mean "stop everything in order". Supervision halts at once: a
        # Ctrl-C in the terminal also reaches the children, whose exits must not be restarted
        stop = threading.Event()

        def request_stop(*_):
            cluster.supervisor.halt()
            stop.set()

        for sig in previous:
            signal.signal(sig, request_stop)
        if args.ask is not None:
            ca = str(cluster.workdir / "certs" / "ca.pem") if args.tls else None
            return print_stream(cluster.gateway_address, build_request(args.ask, chat=True, max_tokens=args.max_tokens, temperature=0.0), 300, tls_ca=ca)
        tls_hint = f" --tls-ca {cluster.workdir / 'certs' / 'ca.pem'}" if args.tls else ""
        print(f'try: tandem generate --gateway {cluster.gateway_address}{tls_hint} --chat "What is the capital of France?"', file=sys.stderr)
        if cluster.gateway_http_url:
            print(f"  or: curl{tls_hint.replace('--tls-ca', '--cacert')} {cluster.gateway_http_url}/chat/completions -H 'Content-Type: application/json' "
                  f"-d '{{\"model\": \"{args.model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'", file=sys.stderr)  # fmt: skip
        print(f"Ctrl-C stops everything. A service that exits is restarted (at most {args.max_restarts} times in a row).", file=sys.stderr)
        while not stop.wait(0.5):
            if cluster.supervisor.failed:  # only etcd's loss ends the cluster; other give-ups leave the rest up
                print(f"tandem: {cluster.supervisor.failed}; stopping (logs in {cluster.workdir})", file=sys.stderr)
                return 1
        return 0
    finally:
        print("stopping Tandem ...", file=sys.stderr)
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    from services.common.config import DEFAULT_GRPC_PORTS, ROLES, add_config_args

    parser = argparse.ArgumentParser(prog="tandem", description="LLM serving with disaggregated prefill and decode")
    sub = parser.add_subparsers(dest="command", required=True)
    gateway = f"127.0.0.1:{DEFAULT_GRPC_PORTS['gateway']}"

    model = sub.add_parser("model", help="manage models").add_subparsers(dest="model_command", required=True)
    prep = model.add_parser("prepare", help="convert the embedded default model (once; cached)")
    prep.add_argument("--force", action="store_true", help="convert again even if the cache is complete")
    prep.set_defaults(func=cmd_model_prepare)

    up = sub.add_parser("up", help="run the whole system locally: etcd, tokenizer, prefill, decode, gateway")
    up.add_argument("--model", default="default", help="HF model directory, or 'default' (embedded SmolLM2-135M)")
    up.add_argument(
        "--prefill", type=int, default=None, help=f"prefill workers (default: 1 on machines of {SPLIT_MIN_CORES}+ cores, else 0: the decode worker prefills)"
    )
    up.add_argument("--decode", type=int, default=1, help="decode workers")
    up.add_argument("--base-port", type=int, default=None, help=f"the gateway's port; the others follow (default {DEFAULT_GRPC_PORTS['gateway']})")
    up.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="the gateway's OpenAI-compatible HTTP API port (default 8000, or after the other ports with --base-port; 0 = off)",
    )
    up.add_argument("--etcd", default=None, help="use this etcd (host:port) instead of starting one")
    up.add_argument("--cluster", default="default", help="cluster name (etcd key prefix)")
    # 2 GiB, as the offline engine's default: at 0.5 a worker held 43 of a 64 x (256 -> 128) fp32 burst
    # and the other 21 waited for the first to finish (TTFT p99 49 s against vLLM's 33 with its 4 GiB);
    # the pool is reserved, not touched, until used
    up.add_argument("--kv-cache-gb", type=float, default=2.0, help="KV cache memory per worker (GiB)")
    up.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    up.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = the cores divided among the workers)")
    up.add_argument(
        "--routing-policy",
        default="prefix-aware",
        choices=["prefix-aware", "least-loaded", "random", "round-robin"],
        help="how the gateway picks a decode worker",
    )
    up.add_argument(
        "--disagg-min-uncached-tokens",
        type=int,
        default=512,
        help="a prompt whose uncached part on the chosen decode worker is this long or longer is prefilled on a prefill "
        "worker and its KV pulled by decode over UCX (0 = never)",
    )
    up.add_argument("--scheduling-config", default=None, help="a TOML file of scheduling weights and thresholds for the gateway")
    up.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="restarts in a row (with backoff 1 s, 2 s, 4 s ... 30 s) of a service that keeps exiting before giving up on "
        "it; a service that stayed up 60 s starts a new count (0 = never restart). etcd is given 3",
    )
    up.add_argument("--workdir", default=None, help="where logs and etcd data go (default: a new temp dir)")
    up.add_argument(
        "--tls",
        action="store_true",
        help="mTLS between every service and TLS on the gateway's gRPC and HTTP ports, with development certificates "
        "made in WORKDIR/certs (`tandem certs`); clients trust WORKDIR/certs/ca.pem. Its own etcd also gets "
        "user/password auth: services log in as `tandem` (password in WORKDIR/certs/etcd-password, 0600)",
    )
    up.add_argument("--ask", metavar="PROMPT", default=None, help="send this chat prompt once everything is up, print the answer, and stop")
    up.add_argument("--max-tokens", type=int, default=64, help="max_tokens for --ask")
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run one service (what a container runs)")
    serve_roles = serve.add_subparsers(dest="role", required=True)
    for role in ROLES:
        p = serve_roles.add_parser(role, help=f"the {role} service")
        add_config_args(p, role)
        p.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="stream a generation from the gateway")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    gen.add_argument("--gateway", default=gateway, help=f"gateway address (default {gateway})")
    gen.add_argument("--max-tokens", type=int, default=None, help="default: the gateway's (256)")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    gen.add_argument(
        "--api-key", default=os.environ.get("TANDEM_API_KEY"), help="sent as `authorization: Bearer KEY` when the gateway requires keys (env TANDEM_API_KEY)"
    )
    gen.add_argument(
        "--tls-ca", default=os.environ.get("TANDEM_TLS_CA"), help="CA file: connect with TLS to a gateway whose certificate it signed (env TANDEM_TLS_CA)"
    )
    gen.add_argument(
        "--mode",
        choices=["auto", "aggregated", "disaggregated"],
        default="auto",
        help="force where the prompt is prefilled (default: the gateway decides by prompt length)",
    )
    gen.set_defaults(func=cmd_generate)

    from .scheduling_cli import add_parser as add_scheduling_parser

    add_scheduling_parser(sub, "127.0.0.1:2379")

    from .certs import add_parser as add_certs_parser

    add_certs_parser(sub)

    from loadtest.bench_cli import add_bench_args

    bench = sub.add_parser("bench", help="load-test the gateway (or one worker) and report vLLM-comparable numbers (docs/benchmarking.md)")
    add_bench_args(bench)
    bench.set_defaults(func=cmd_bench)

    health = sub.add_parser("health", help="grpc.health.v1 Check; exit 0 when SERVING")
    health.add_argument("address", help="host:port")
    health.add_argument("--service", default="", help="service name ('' = the server)")
    health.add_argument("--timeout", type=float, default=2.0)
    health.add_argument("--tls-dir", default=None, help="a `tandem certs` directory: connect with its client certificate (TLS workers require one)")
    health.add_argument("--role", default=None, help="with --tls-dir: the role the server's certificate must name (gateway, tokenizer, prefill, decode)")
    health.set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
