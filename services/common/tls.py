"""TLS credentials for the gRPC servers and the channels between services, from PEM files.

    settings tls_cert / tls_key / tls_ca   all three empty: plaintext (local development)
    server   worker roles: mTLS — a client certificate signed by tls_ca is required
             gateway:      TLS — its public API authenticates clients with API keys instead
    client   presents tls_cert, trusts only tls_ca, and checks that the server's certificate
             names the role it dialed (`tandem-<role>`), not merely some host of the cluster

Rotation: the server re-reads the three files when their mtimes change, at the next handshake
(grpc's dynamic credentials), so a renewed certificate is served without a restart and in-flight
RPCs keep their connection. A client channel presents the certificate it was dialed with; the
gateway's channels (rotating_channel.py) notice a rotation and dial again for new calls.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import grpc

from .peer_roles import role_identity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    ca: str

    @classmethod
    def from_config(cls, config) -> TlsFiles | None:
        """The config's TLS files, or None when TLS is off. Raises ValueError when only some are set
        or one cannot be read (a clear error at startup, not a failed handshake later)."""
        names = {"tls_cert": config.tls_cert, "tls_key": config.tls_key, "tls_ca": config.tls_ca}
        given = [n for n, v in names.items() if v]
        if not given:
            return None
        if len(given) != 3:
            missing = ", ".join(n for n in names if n not in given)
            raise ValueError(f"TLS needs tls_cert, tls_key and tls_ca together; {missing} not set")
        for name, path in names.items():
            if not os.access(path, os.R_OK):
                raise ValueError(f"{name}: cannot read {path!r}")
        return cls(config.tls_cert, config.tls_key, config.tls_ca)

    def read(self) -> tuple[bytes, bytes, bytes]:
        with open(self.cert, "rb") as c, open(self.key, "rb") as k, open(self.ca, "rb") as a:
            return c.read(), k.read(), a.read()

    def fingerprint(self) -> tuple[int, ...]:
        """(mtime, size) of the three files: a cheap test for a rotation (three stat calls, no reading;
        a rewrite within one mtime tick still changes the size, as a new certificate nearly always does)."""
        return tuple(v for p in (self.cert, self.key, self.ca) for st in (os.stat(p),) for v in (st.st_mtime_ns, st.st_size))

    def read_checked(self) -> tuple[bytes, bytes, bytes]:
        """read(), refusing (ValueError) a certificate whose key is not the one beside it: a
        rotation caught half-written (key written, certificate not yet) fails every handshake."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert, key, ca = self.read()
        try:
            public = x509.load_pem_x509_certificate(cert).public_key()
            private = serialization.load_pem_private_key(key, password=None)
            x509.load_pem_x509_certificates(ca)
        except (ValueError, TypeError) as e:
            raise ValueError(f"cannot load the TLS files {self.cert}, {self.key}, {self.ca}: {e}") from None
        spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        if public.public_bytes(*spki) != private.public_key().public_bytes(*spki):
            raise ValueError(f"{self.key} is not the private key of {self.cert} (a rotation in progress?)")
        return cert, key, ca


class _ReloadingServerConfig:
    """grpc calls fetch() (from its own threads) before each handshake: a new configuration when
    the files changed, None to keep the current one. A half-written rotation (unreadable, or a
    key that does not match yet) keeps serving the previous certificate and retries next time."""

    def __init__(self, files: TlsFiles):
        self.files = files
        self._lock = threading.Lock()
        self._fingerprint = files.fingerprint()
        self.initial = self._config(*files.read())

    @staticmethod
    def _config(cert: bytes, key: bytes, ca: bytes):
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self):
        try:
            with self._lock:
                fingerprint = self.files.fingerprint()
                if fingerprint == self._fingerprint:
                    return None
                config = self._config(*self.files.read_checked())
                self._fingerprint = fingerprint
            log.info("TLS certificate files changed: serving the new certificate")
            return config
        except Exception as e:  # noqa: BLE001 - never fail the handshake of a server that has a good certificate
            log.warning("TLS certificate reload failed, serving the previous one: %s", e)
            return None


def server_credentials(files: TlsFiles, require_client_auth: bool) -> grpc.ServerCredentials:
    reloader = _ReloadingServerConfig(files)
    return grpc.dynamic_ssl_server_credentials(reloader.initial, reloader.fetch, require_client_authentication=require_client_auth)


def channel_credentials(files: TlsFiles, pem: tuple[bytes, bytes, bytes] | None = None) -> grpc.ChannelCredentials:
    """Client credentials from `files` (read now), or from `pem` (cert, key, ca) already read."""
    cert, key, ca = pem or files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def role_channel_options(role: str) -> list[tuple[str, str]]:
    """Check the server's certificate against its role's name rather than the dialed host: the
    CA vouches for roles, and a worker at some address is only trusted as the role it proves."""
    return [("grpc.ssl_target_name_override", role_identity(role))]


def dial(files: TlsFiles | None, address: str, role: str, options=(), interceptors=None, pem: tuple[bytes, bytes, bytes] | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to a `role` service at `address`: plaintext when `files` is None. `pem`:
    the files' contents already read (and checked: TlsFiles.read_checked). The channel presents
    the certificate it was made with; rotating_channel.py follows rotations."""
    if files is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    credentials = channel_credentials(files, pem)
    return grpc.aio.secure_channel(address, credentials, options=[*options, *role_channel_options(role)], interceptors=interceptors)
