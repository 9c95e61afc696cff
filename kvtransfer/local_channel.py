"""The same-host channel: a local pull's request, answer and note over a Unix socket kept open
between the two processes, instead of UCX messages over a fresh pair of endpoints per pull.

Why: once the blocks are read with process_vm_readv (local_read.py), what is left of a local pull
is its fixed cost. On the 12-08 Zen 4 a 64-block local pull took 5.8-6.0 ms, of which the read
3.7 ms; most of the rest was UCX: the client's endpoint to the server and the server's back to the
client, ~0.5 ms to wire up each, then the request and the answer (docs/benchmarks.md, 12-08).
Endpoints cannot be kept across pulls or dialed ahead: UCX pairs the n-th endpoint one worker dials
to another with the n-th dialed back, and pulls whose endpoints crossed failed ("Request
canceled"; ucx_transport's order test). A Unix socket has no such pairing, and a round trip over
one costs ~0.1 ms.

Who may use it: the channel serves local reads only, so it lives where they are offered. The server
listens on an abstract socket (Linux: no file to create or clean up; scoped to the network
namespace, so containers with their own network namespace cannot reach it, and their local reads go
on as UCX requests, as before the channel). A connection must first say which UCX worker it speaks
for and prove it with that worker's channel key, HMAC(the server's secret, the worker's address).
The server hands the key out only in its answer to a local-read request that came over UCX, and
sends that answer to the token's bound peer alone. So a connection is the peer whose address it
proved, requests on it are checked against the tokens bound to that address exactly as UCX requests
are, and the tokens' binding to one decode worker holds on the channel too.

Frames: a u32 little-endian length, then the body. A connection carries HELLO and its answer (a
PullResponse: OK, or why not), then one pull at a time: REQUEST (a PullRequest) → RESPONSE (a
PullResponse) → NOTE (READ, once the client has read the blocks and the check word). A client keeps
idle connections for reuse, one for each pull it has run at once, so concurrent pulls never wait on
one another's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass

from .ucx_protocol import MAGIC, MAX_ADDRESS_BYTES, MAX_REQUEST_BYTES, PullResponse, Status

log = logging.getLogger(__name__)

KEY_BYTES = 16
SECRET_BYTES = 32
HELLO_TIMEOUT = 2.0  # a connection that has not said who it is by then is closed
_FRAME = struct.Struct("<I")
_HELLO = "<4sH"  # magic, client address length; then the address, then the key
MAX_HELLO_BYTES = struct.calcsize(_HELLO) + MAX_ADDRESS_BYTES + KEY_BYTES  # what an unproven connection may make the server read


def channel_name(server_id: int) -> bytes:
    """A fresh abstract socket name for one server (the pid and server id name it in `ss -x`; the
    random part keeps a restarted server's name new, so a client never keeps a dead server's key)."""
    return f"tandem-kv-{os.getpid()}-{server_id:08x}-{secrets.token_hex(4)}".encode()


def listening_socket(name: bytes) -> socket.socket:
    """The server's abstract Unix socket, bound and listening. Made here rather than by asyncio, whose
    uvloop flavour refuses abstract names (a NUL, then the name)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(b"\0" + name)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def connected_socket(name: bytes) -> socket.socket:
    """A socket connected to the channel `name`. A local connect is done or refused at once;
    BlockingIOError where the server's backlog is full (it is not accepting)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(b"\0" + name)
    except BaseException:
        sock.close()
        raise
    return sock


def channel_key(secret: bytes, client_address: bytes) -> bytes:
    """What proves a connection speaks for the UCX worker at `client_address`."""
    return hmac.digest(secret, client_address, "sha256")[:KEY_BYTES]


@dataclass(frozen=True)
class Hello:
    client_address: bytes  # the UCX worker address the connection speaks for
    key: bytes

    def pack(self) -> bytes:
        return struct.pack(_HELLO, MAGIC, len(self.client_address)) + self.client_address + self.key

    @classmethod
    def unpack(cls, buf: bytes) -> Hello:
        magic, alen = struct.unpack_from(_HELLO, buf, 0)
        if magic != MAGIC:
            raise ValueError("bad hello magic")
        off = struct.calcsize(_HELLO)
        if len(buf) != off + alen + KEY_BYTES:
            raise ValueError("bad hello length")
        return cls(bytes(buf[off : off + alen]), bytes(buf[off + alen :]))


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_REQUEST_BYTES) -> bytes:
    """One frame's body; asyncio.IncompleteReadError at the end of the stream, ValueError when the
    length is beyond `limit` (any message of the protocol; a hello: MAX_HELLO_BYTES)."""
    (n,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    if n > limit:
        raise ValueError(f"a {n}-byte frame: larger than the message it should be")
    return await reader.readexactly(n)


def write_frame(writer: asyncio.StreamWriter, body: bytes) -> None:
    """Queue one frame (the messages are small: the socket takes them at once, no drain needed)."""
    writer.write(_FRAME.pack(len(body)) + body)


class Connection:
    """One greeted connection to a server's channel, on the loop that opened it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    def send(self, body: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionError("the channel connection is closed")
        write_frame(self._writer, body)

    async def receive(self) -> bytes:
        return await read_frame(self._reader)

    @property
    def usable(self) -> bool:
        return not (self._writer.is_closing() or self._reader.at_eof())

    def close(self) -> None:
        self._writer.close()


class ChannelRefused(Exception):
    """The channel cannot be used for this pull (unreachable, full, or it refused the key): the pull
    goes as a UCX request instead."""


class Channels:
    """A client's view of servers' channels: the keys it was handed, by channel name, and its idle
    connections to them. Lives on the UCX loop, as the pulls do."""

    def __init__(self, max_servers: int = 256, max_idle: int = 8):
        self._keys: OrderedDict[bytes, bytes] = OrderedDict()  # least recently used first
        self._idle: dict[bytes, list[Connection]] = {}
        self._unreachable: OrderedDict[bytes, None] = OrderedDict()  # channels no connection reached: keys for them are not kept
        self._max_servers, self._max_idle = max_servers, max_idle

    def learn(self, name: bytes, key: bytes) -> None:
        if not name or len(key) != KEY_BYTES or name in self._unreachable:
            return
        self._keys[name] = key
        self._keys.move_to_end(name)
        while len(self._keys) > self._max_servers:
            self.forget(next(iter(self._keys)))

    def knows(self, name: bytes) -> bool:
        return name in self._keys

    def forget(self, name: bytes) -> None:
        """Stop using this channel: its key is dropped, its idle connections closed."""
        self._keys.pop(name, None)
        for conn in self._idle.pop(name, []):
            conn.close()

    async def take(self, name: bytes, client_address: bytes) -> Connection:
        """An idle connection to the channel, or a new one that has said hello; ChannelRefused where
        none can be had (the key is forgotten where the server cannot be reached or refused it)."""
        self._prune()
        idle = self._idle.get(name, [])
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn
            conn.close()
        key = self._keys.get(name)
        if key is None:
            raise ChannelRefused("no key for this channel")
        try:
            reader, writer = await asyncio.open_unix_connection(sock=connected_socket(name))
        except BlockingIOError:
            raise ChannelRefused("the server's backlog is full") from None
        except OSError as e:  # another network namespace, or the server is gone
            self.forget(name)
            self._unreachable[name] = None
            while len(self._unreachable) > self._max_servers:
                self._unreachable.popitem(last=False)
            raise ChannelRefused(f"cannot connect: {e}") from None
        conn = Connection(reader, writer)
        try:
            conn.send(Hello(client_address, key).pack())
            async with asyncio.timeout(HELLO_TIMEOUT):
                answer = PullResponse.unpack(await conn.receive())
        except (OSError, EOFError, ValueError, struct.error, TimeoutError) as e:  # full, closing, or not a channel
            conn.close()
            raise ChannelRefused(f"no answer to hello: {type(e).__name__}: {e}") from None
        except BaseException:
            conn.close()
            raise
        if answer.status is not Status.OK:
            conn.close()
            self.forget(name)
            raise ChannelRefused(f"hello refused ({answer.status.name}): {answer.message}")
        return conn

    def give_back(self, name: bytes, conn: Connection) -> None:
        """A connection whose last pull ended cleanly (its note sent, or the server's refusal read)."""
        idle = self._idle.setdefault(name, []) if name in self._keys else None
        if idle is None or len(idle) >= self._max_idle or not conn.usable:
            conn.close()
        else:
            idle.append(conn)

    def _prune(self) -> None:
        """Close idle connections the server has closed, and forget a channel all of whose idle
        connections it closed (the server is gone: its name never comes back), so that a worker whose
        prefill peers come and go keeps no socket to the dead ones."""
        for name in list(self._idle):
            idle = self._idle[name]
            live = [c for c in idle if c.usable]
            if len(live) == len(idle):
                continue
            for conn in idle:
                if not conn.usable:
                    conn.close()
            if live:
                self._idle[name] = live
            else:
                self.forget(name)

    def idle_connections(self, name: bytes) -> int:
        return len(self._idle.get(name, []))

    def close(self) -> None:
        for name in list(self._idle):
            for conn in self._idle.pop(name):
                with contextlib.suppress(Exception):
                    conn.close()
