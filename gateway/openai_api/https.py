"""HTTPS for the OpenAI API: a server SSL context that follows its certificate files on disk.

Each TLS handshake calls the SNI callback first (with or without a server name); it stats the
certificate and key files and, when they changed, builds a fresh context from them and hands it
to this connection (`ssl_object.context = ...`), as every later one gets. A renewed certificate
(cert-manager, `tandem certs`) is served at the next handshake, without a restart; connections
already open keep theirs, so no in-flight request is dropped. A half-written rotation (files that
do not load yet) keeps the previous certificate and is retried at the next handshake.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading

log = logging.getLogger(__name__)


def _server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class ReloadingServerContext:
    """`.context` is what aiohttp's TCPSite takes (ssl_context=); it never changes itself."""

    def __init__(self, cert: str, key: str):
        self.cert, self.key = cert, key
        self._lock = threading.Lock()
        self._mtimes = self._stat()
        self._current = _server_context(cert, key)  # raises at startup on bad files: a clear error then
        self.context = _server_context(cert, key)
        self.context.sni_callback = self._on_hello

    def _stat(self) -> tuple[int, int]:
        return os.stat(self.cert).st_mtime_ns, os.stat(self.key).st_mtime_ns

    def latest(self) -> ssl.SSLContext:
        """The context of the files as they are now (reloaded when they changed since last time)."""
        with self._lock:
            try:
                mtimes = self._stat()
                if mtimes != self._mtimes:
                    self._current = _server_context(self.cert, self.key)
                    self._mtimes = mtimes
                    log.info("HTTPS certificate files changed: serving the new certificate")
            except (OSError, ssl.SSLError) as e:
                log.warning("HTTPS certificate reload failed, serving the previous one: %s", e)
            return self._current

    def _on_hello(self, ssl_object, server_name, initial_context):
        ssl_object.context = self.latest()
        return None  # continue the handshake
