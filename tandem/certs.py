"""`tandem certs`: a development CA and one certificate per role, made with `cryptography`.

    DIR/ca.pem, ca-key.pem                the cluster's CA (keep ca-key.pem off the serving hosts)
    DIR/<role>.pem, <role>-key.pem        gateway, tokenizer, prefill, decode, etcd, client

Each role certificate names its role as a DNS SAN (`tandem-<role>`, also its CN): that SAN is the
identity services check (services/common/peer_roles.py maps a peer's certificate to its role, and
clients verify a server's role with it rather than with the host they dialed). It also carries
localhost, 127.0.0.1 and any hosts given, so tools that check host names (etcd clients, curl,
the OpenAI SDK) accept it. Every certificate is valid for serving and for client authentication:
a worker is a server to the gateway and a client of its peers. Private keys are written 0600.

This is for development and tests; production clusters use their own PKI (cert-manager, SPIFFE).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.peer_roles import role_identity  # the DNS SAN naming a role: one definition

CERT_ROLES = ("gateway", "tokenizer", "prefill", "decode", "etcd", "client")
DEFAULT_DAYS = 365


@dataclass(frozen=True)
class RoleFiles:
    cert: Path
    key: Path


def role_files(directory: str | os.PathLike, role: str) -> RoleFiles:
    d = Path(directory)
    return RoleFiles(d / f"{role}.pem", d / f"{role}-key.pem")


def ca_file(directory: str | os.PathLike) -> Path:
    return Path(directory) / "ca.pem"


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: fast handshakes, accepted by grpc (BoringSSL), OpenSSL and etcd's Go TLS
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # created 0600 from the start: never world-readable, not even for a moment
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _san_entries(role: str, hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(role_identity(role)), x509.DNSName("localhost")]
    ips = {"127.0.0.1", "::1"}
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            ips.add(str(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in sorted(ips)]


def make_ca(days: int = DEFAULT_DAYS, name: str = "Tandem development CA"):
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_role_cert(ca_cert, ca_key, role: str, hosts: tuple[str, ...] = (), days: int = DEFAULT_DAYS, not_before: datetime.datetime | None = None):
    """A certificate for `role` signed by the CA. `not_before` (tests) backdates it, e.g. to make
    an already-expired certificate with a negative `days`."""
    if role not in CERT_ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(CERT_ROLES)}")
    key = _new_key()
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=days) if days > 0 else start + datetime.timedelta(seconds=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role_identity(role))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san_entries(role, hosts)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def write_role_cert(directory: str | os.PathLike, ca_cert, ca_key, role: str, hosts: tuple[str, ...] = (), days: int = DEFAULT_DAYS, **kw) -> RoleFiles:
    files = role_files(directory, role)
    cert, key = make_role_cert(ca_cert, ca_key, role, hosts, days, **kw)
    # key first, then the certificate: a reloader that sees the new certificate finds its key
    _write_key(files.key, key)
    _write_cert(files.cert, cert)
    return files


def load_ca(directory: str | os.PathLike):
    d = Path(directory)
    cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((d / "ca-key.pem").read_bytes(), password=None)
    return cert, key


def create(directory: str | os.PathLike, roles: tuple[str, ...] = CERT_ROLES, hosts: tuple[str, ...] = (), days: int = DEFAULT_DAYS) -> Path:
    """Write a CA (reusing DIR's CA when there is one, so that adding a role keeps the others
    valid) and a certificate per role into `directory`. Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    if (d / "ca.pem").exists() and (d / "ca-key.pem").exists():
        ca_cert, ca_key = load_ca(d)
    else:
        ca_cert, ca_key = make_ca(days=max(days, DEFAULT_DAYS))
        _write_key(d / "ca-key.pem", ca_key)
        _write_cert(d / "ca.pem", ca_cert)
    for role in roles:
        write_role_cert(d, ca_cert, ca_key, role, hosts, days)
    return d


def add_parser(sub) -> None:
    p = sub.add_parser("certs", help="create a development CA and per-role TLS certificates (tandem up --tls makes its own)")
    p.add_argument("directory", help="where to write ca.pem and <role>.pem / <role>-key.pem (created 0700; keys 0600)")
    p.add_argument("--hosts", default="", help="comma-separated extra host names and IPs for every certificate's SANs (localhost and 127.0.0.1 are always in)")
    p.add_argument("--roles", default=",".join(CERT_ROLES), help=f"comma-separated roles (default all: {','.join(CERT_ROLES)})")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity of the role certificates in days")
    p.set_defaults(func=cmd_certs)


def cmd_certs(args) -> int:
    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    unknown = [r for r in roles if r not in CERT_ROLES]
    if unknown or not roles:
        print(f"error: --roles: unknown role(s) {', '.join(unknown) or '(none given)'}; roles: {', '.join(CERT_ROLES)}")
        return 2
    if args.days < 1:
        print(f"error: --days must be >= 1, got {args.days}")
        return 2
    d = create(args.directory, roles, tuple(h for h in args.hosts.split(",") if h.strip()), args.days)
    print(f"wrote {d}/ca.pem and {', '.join(f'{r}.pem' for r in roles)} (keys *-key.pem, mode 0600)")
    return 0
