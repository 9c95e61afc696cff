"""RotatingChannel: a client channel to one service that follows rotations of our TLS files.

A grpc channel presents the client certificate it was made with for as long as it lives, and the
gateway's channels to its workers live as long as the workers. Without this, a renewed gateway
certificate would only be presented by channels dialed later, and an expiring one would go on
being presented until the workers refuse it.

    current()    every call picks its channel here; at most once per CHECK_INTERVAL_S it compares
                 the files' fingerprint (mtime and size: two stat calls, no reading)
    on a change  the new files are read and checked (the key must match the certificate: a
                 rotation caught half-written keeps the current channel and is looked at again
                 next time); a new channel takes the new calls, `on_rotate` is told (the gateway
                 moves its Watch stream), and the old channel takes no new call and closes once
                 its in-flight calls end — at most ROTATION_GRACE_S later, when stragglers are
                 cancelled
    plaintext    (files None) a plain channel that never rotates
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from .tls import TlsFiles, dial

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
# in-flight calls on a replaced channel may take this long to end; their connection was
# authenticated at its handshake and stays valid, so they are given ample time
ROTATION_GRACE_S = 600.0


class RotatingChannel:
    def __init__(self, files: TlsFiles | None, address: str, role: str, options=(), interceptors=None,
                 on_rotate: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.files, self.address, self.role = files, address, role
        self._options, self._interceptors = list(options), interceptors
        self._on_rotate, self._clock = on_rotate, clock
        self._fingerprint, pem = None, None
        if files is not None:
            try:
                self._fingerprint, pem = files.fingerprint(), files.read_checked()
            except ValueError as e:  # mid-rotation: dial with the files as they are, and look again next time
                self._fingerprint = None
                log.warning("TLS files for the channel to %s: %s", address, e)
        self._channel = dial(files, address, role, self._options, interceptors, pem=pem)
        self._checked_at = clock()
        self._warned: tuple | None = None  # the fingerprint last refused, logged once
        self._retiring: dict[grpc.aio.Channel, asyncio.Task] = {}  # replaced channels, closing
        self._closed = False
        self.num_rotations = 0

    def current(self) -> grpc.aio.Channel:
        """The channel new calls must use (a rotation may replace it here). Mutates."""
        if self.files is not None and not self._closed and self._clock() - self._checked_at >= CHECK_INTERVAL_S:
            self._checked_at = self._clock()
            self._rotate_if_changed()
        return self._channel

    def _rotate_if_changed(self) -> None:
        try:
            fingerprint = self.files.fingerprint()
            if fingerprint == self._fingerprint:
                return
            pem = self.files.read_checked()
        except (OSError, ValueError) as e:
            seen = fingerprint_or_none(self.files)
            if seen != self._warned:
                self._warned = seen
                log.warning("TLS files changed but cannot be used yet (keeping the current client certificate for %s): %s", self.address, e)
            return
        old = self._channel
        self._channel = dial(self.files, self.address, self.role, self._options, self._interceptors, pem=pem)
        self._fingerprint, self._warned = fingerprint, None
        self.num_rotations += 1
        self._retiring[old] = asyncio.create_task(self._retire(old), name=f"retire channel to {self.address}")
        log.info("TLS client certificate changed: new calls to the %s at %s use a new connection", self.role, self.address)
        if self._on_rotate is not None:
            self._on_rotate()

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        try:
            await channel.close(grace=ROTATION_GRACE_S)  # no new calls; waits for the in-flight ones
        finally:
            self._retiring.pop(channel, None)

    async def close(self, grace: float | None = None) -> None:
        """Close the current channel (in-flight calls get `grace` seconds) and any replaced one
        still draining (their calls are cancelled now). Idempotent."""
        self._closed = True
        retiring = list(self._retiring.items())
        for _, task in retiring:
            task.cancel()
        await asyncio.gather(*(task for _, task in retiring), return_exceptions=True)
        await asyncio.gather(self._channel.close(grace), *(channel.close() for channel, _ in retiring))


def fingerprint_or_none(files: TlsFiles) -> tuple | None:
    try:
        return files.fingerprint()
    except OSError:
        return None
