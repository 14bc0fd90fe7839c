"""TLS for ``rediss://``: the client's SSL context, and TLS failures explained in one line.

Certificates are always verified and the server's name (or IP address) is always checked
against its certificate: there is no option to turn either off. A client certificate is
presented when one is configured (Redis's ``tls-auth-clients yes``).
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from agentcomms.exceptions import ConfigError

__all__ = ["client_context", "describe_tls_error"]

CA_CERTS = "REDIS_SSL_CA_CERTS"
CERTFILE = "REDIS_SSL_CERTFILE"
KEYFILE = "REDIS_SSL_KEYFILE"


class _EncryptedKey(Exception):
    """OpenSSL asked for the key's password (raised by the password callback instead of prompting on a terminal)."""


def _refuse_password() -> bytes:
    raise _EncryptedKey


def _read(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {variable}: {exc.strerror or exc}", path=str(path)) from None


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's text without ``[SSL: CODE]`` and ``(_ssl.c:123)``."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    text = re.sub(r"^\[[A-Z0-9_]+(: [A-Z0-9_]+)?\] ", "", text)
    return re.sub(r" \(_ssl\.c:\d+\)$", "", text).strip() or exc.reason or type(exc).__name__


def client_context(
    ca_certs: str | Path | None = None, certfile: str | Path | None = None, keyfile: str | Path | None = None
) -> ssl.SSLContext:
    """An SSL context that verifies the server against ``ca_certs`` and presents ``certfile`` if given.

    Args:
        ca_certs: PEM file of the CA certificates to trust (default: the system's).
        certfile: PEM file of this client's certificate (and chain); its key too if ``keyfile`` is not given.
        keyfile: PEM file of the (unencrypted) private key of ``certfile``.

    Raises:
        ConfigError: a file cannot be read or holds no usable certificate or key, the key does not match
            the certificate, or a key is given without a certificate. The message names the file and
            the setting, never a key's contents.
    """
    ca = Path(ca_certs).expanduser() if ca_certs else None
    cert = Path(certfile).expanduser() if certfile else None
    key = Path(keyfile).expanduser() if keyfile else None
    if key is not None and cert is None:
        raise ConfigError(f"{KEYFILE} is set without {CERTFILE}: give the client certificate too", path=str(key))
    cafile = None
    if ca is not None:
        if b"CERTIFICATE-----" not in _read(ca, CA_CERTS):  # BEGIN CERTIFICATE, BEGIN TRUSTED CERTIFICATE
            raise ConfigError(f"{CA_CERTS} holds no PEM certificate", path=str(ca))
        cafile = str(ca)
    try:
        context = ssl.create_default_context(cafile=cafile)  # verification and host name checking on
    except (OSError, ssl.SSLError) as exc:  # read a moment ago: unreadable now, or OpenSSL refuses it
        detail = _reason(exc) if isinstance(exc, ssl.SSLError) else exc.strerror or str(exc)
        raise ConfigError(f"cannot use {CA_CERTS}: {detail}", path=str(ca)) from None
    if cert is not None:
        _load_client_certificate(context, cert, key)
    return context


def _load_client_certificate(context: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    cert_text = _read(cert, CERTFILE)
    if b"-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ConfigError(f"{CERTFILE} holds no PEM certificate", path=str(cert))
    key_text, key_variable = (_read(key, KEYFILE), KEYFILE) if key is not None else (cert_text, CERTFILE)
    key_path = str(key or cert)
    if not re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", key_text):
        missing = f"{KEYFILE} holds no PEM private key" if key else f"{CERTFILE} holds no private key: set {KEYFILE}"
        raise ConfigError(missing, path=key_path)
    if re.search(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED", key_text):  # PKCS#8, or OpenSSL's
        raise ConfigError(f"{key_variable}: the private key is encrypted; use an unencrypted key file", path=key_path)
    try:
        context.load_cert_chain(str(cert), str(key) if key else None, password=_refuse_password)
    except _EncryptedKey:
        message = f"{key_variable}: the private key is encrypted; use an unencrypted key file"
        raise ConfigError(message, path=key_path) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{key_variable} is not the key of the certificate in {cert}", path=key_path) from None
        raise ConfigError(f"cannot use {CERTFILE} and {KEYFILE}: {_reason(exc)}", path=str(cert)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the client certificate or key: {exc.strerror or exc}", path=str(cert)) from None


_VERIFY_HINTS = {
    2: f"; is {CA_CERTS} the CA that signed the server's certificate?",  # unable to get issuer certificate
    18: f"; is {CA_CERTS} the CA that signed the server's certificate?",  # self-signed certificate
    19: f"; is {CA_CERTS} the CA that signed the server's certificate?",  # self-signed certificate in chain
    20: f"; is {CA_CERTS} the CA that signed the server's certificate?",  # unable to get local issuer certificate
    21: f"; is {CA_CERTS} the CA that signed the server's certificate?",  # unable to verify the first certificate
    62: "; connect by a name the certificate lists",  # hostname mismatch
    64: "; connect by an address the certificate lists",  # IP address mismatch
}

_CLIENT_CERT_REFUSED = {
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_ACCESS_DENIED",
    "TLSV1_ALERT_DECRYPT_ERROR",
}

_NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"}


def describe_tls_error(exc: ssl.SSLError) -> str:
    """One line that says the failure was TLS and why (a certificate that did not verify, a client certificate ...).

    Args:
        exc: what the handshake (or the first read after it, for TLS 1.3 client certificates) raised.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = (exc.verify_message or _reason(exc)).rstrip(".")
        hint = _VERIFY_HINTS.get(exc.verify_code, "")
        return f"TLS handshake failed: certificate verification of the server failed: {why}{hint}"
    reason = exc.reason or ""
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return f"TLS handshake failed: the server requires a client certificate (set {CERTFILE} and {KEYFILE})"
    if reason in _CLIENT_CERT_REFUSED:
        return f"TLS handshake failed: the server refused this client certificate ({CERTFILE}): {_reason(exc)}"
    if reason in _NOT_TLS:
        return f"TLS handshake failed: the server did not answer in TLS ({_reason(exc)}); is this its TLS port?"
    return f"TLS error: {_reason(exc)}"
