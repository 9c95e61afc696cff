"""KV-cache block transfer between a prefill worker (server) and a decode worker (client) over UCX.

    client = KVTransportClient(kv_cache.storage); await client.start()   # decode; client.address → etcd
    server = KVTransportServer(kv_cache.storage); await server.start()
    server.expose(token, block_ids, expires_at=time.time() + 30,     # one pull of these blocks,
                  peer_address=client.address)                       # by that client only
    handle = (server.address, token, block_ids)                      # → decode, via the gateway
    await client.pull(server.address, token, src_ids, dst_ids, timeout=10)

Data path (ucx_protocol.py has the message flow): the caches are block-major, so each run of
blocks consecutive on both sides is one contiguous range in each cache and travels as one UCX
tagged message, sent straight from the server's cache and received straight into the client's
(other hosts: TCP). On the server's host the client skips the messages: once the server has
checked the token it names its pid, and the client copies the requested runs itself with
process_vm_readv, the copy UCX's CMA lane makes for each message (local_read.py; a 64-block
scattered pull 9.4 → 5.8 ms, benchmarks/kv_pull_latency.py); after the first, such pulls are
requested over a Unix socket kept open to the server (local_channel.py: 5.8 → 4.9 ms, a one-block
pull 2.6 → 1.1 ms). No staging copy on either side. Endpoints are created with error
handling, one pair per pull, so a peer's death fails that pull only: the survivor's requests
fail (a dead sender at once, a dead receiver within UCX's 1 s keepalive) and everything else on
the worker keeps going.

    ucx_server.py    KVTransportServer: token checks, segment sends, the final word
    ucx_client.py    KVTransportClient: request, receives (or a local read) into the cache, failure handling
    ucx_protocol.py  wire formats and tags, KVTransferError
    ucx_segments.py  the cache as block byte ranges, and the segments a pull is sent in
    local_read.py    same-host reads: host identity, when they are offered, process_vm_readv
    local_channel.py same-host requests over a Unix socket: keys, frames, the client's connections
    ucx_endpoint.py  endpoints whose sends and receives are bare UCX requests, and the windowed
                     pipeline that keeps a pull's segments in flight with done-callbacks
    ucx_runtime.py   the UCX context on its own loop thread; the UCX settings and why

Guarantees: no byte of the requested blocks is read before the server accepted the token; a
token allows one pull, by the client it was exposed for (another client's request is dropped
unanswered: the server never dials an address that did not earn it); a pull succeeds only on the
server's final OK, sent after every segment's send completed while the token was still valid, or,
after a local read, on the server's check word still holding the request id once the data was read
(either way, bytes read from blocks the server freed meanwhile never count); a failed or cancelled
pull raises only after no UCX receive into the client's cache, and no local read, is still running,
so the caller may free the destination blocks at once.
"""

from __future__ import annotations

from .ucx_client import KVTransportClient
from .ucx_protocol import KVTransferError
from .ucx_server import KVTransportServer

__all__ = ["KVTransferError", "KVTransportClient", "KVTransportServer"]
