"""Where a Redis server is and how to log in: parsed once from a URL and the settings."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from agentcomms.exceptions import ConfigError
from agentcomms.settings import redact_url
from agentcomms.transport.tls import CA_CERTS, CERTFILE, KEYFILE, client_context

__all__ = ["REQUIRE_TLS", "ConnectionSpec"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 6379

REQUIRE_TLS = "AGENTCOMMS_REQUIRE_TLS"


@dataclass(frozen=True, slots=True)
class ConnectionSpec:
    """One Redis server: address (TCP host and port, or unix socket), TLS, credentials, database.

    Build it with :meth:`from_url`; ``str(spec)`` never shows the password.
    """

    host: str | None = None
    port: int = DEFAULT_PORT
    path: str | None = None
    """Unix socket path (then ``host`` is ``None``)."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    sentinels: tuple[tuple[str, int], ...] = ()
    """Redis Sentinels to ask where the primary is (``redis+sentinel://``), at each connection."""
    service: str = ""
    """The name the sentinels know the primary by."""

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        password: str | None = None,
        username: str | None = None,
        db: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ssl_ca_certs: str | Path | None = None,
        ssl_certfile: str | Path | None = None,
        ssl_keyfile: str | Path | None = None,
        require_tls: bool = False,
        connect_timeout: float = 5.0,
    ) -> ConnectionSpec:
        """Parse ``redis://[user[:password]@]host[:port][/db]``, ``rediss://...`` or ``unix:///path[?db=N]``.

        ``redis+sentinel://[user[:password]@]host:port[,host:port ...]/<service>[/db]`` names Redis
        Sentinels (port 26379 by default) and the service they watch: each connection asks them
        where the primary is, so that after a failover the next connection reaches the new one.
        The credentials are the primary's; the sentinels are asked without any.

        ``password``, ``username`` and ``db`` (``REDIS_PASSWORD``, ``REDIS_USERNAME``, ``REDIS_DB``)
        apply when the URL has none.
        For ``rediss://`` the server's certificate is always verified, against ``ssl_ca_certs``
        (default: the system's CAs), and its name or IP address checked; no URL option turns
        either off. ``ssl_certfile`` / ``ssl_keyfile`` are presented to servers that ask for a
        client certificate. A given ``ssl_context`` is used as it is instead.

        Args:
            url: the Redis URL.
            password: ``REDIS_PASSWORD``, used when the URL has none.
            username: ``REDIS_USERNAME`` (the Redis ACL user), used when the URL has none.
            db: ``REDIS_DB``, used when the URL has none.
            ssl_context: a ready TLS context for ``rediss://`` (not with the ``ssl_*`` files).
            ssl_ca_certs: ``REDIS_SSL_CA_CERTS``: PEM file of the CAs that sign the server's certificate.
            ssl_certfile: ``REDIS_SSL_CERTFILE``: PEM file of this client's certificate.
            ssl_keyfile: ``REDIS_SSL_KEYFILE``: PEM file of its private key (unencrypted).
            require_tls: ``AGENTCOMMS_REQUIRE_TLS``: refuse ``redis://`` (a ``unix://`` socket is local: accepted).
            connect_timeout: seconds a connection (TCP, TLS and the login) may take.

        Raises:
            ConfigError: the URL is not a Redis URL, asks for TLS options, is not TLS while
                ``require_tls`` is on, or a certificate or key file cannot be used.
        """
        files = (ssl_ca_certs, ssl_certfile, ssl_keyfile)
        if ssl_context is not None and any(files):
            raise ConfigError("give either ssl_context or the certificate files (ssl_ca_certs ...), not both")
        try:
            parts = urlsplit(url)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            scheme = parts.scheme.lower()
            _check_tls(url, scheme, query, require_tls=require_tls, configured=ssl_context is not None or any(files))
            url_password = unquote(parts.password) if parts.password else query.get("password")
            username = (unquote(parts.username) if parts.username else query.get("username")) or username
            if scheme == "unix":
                if not parts.path:
                    raise ValueError("a unix:// URL needs a socket path, e.g. unix:///tmp/redis.sock")
                url_db = query.get("db")
                return cls(
                    path=unquote(parts.path),
                    username=username or None,
                    password=url_password or password,
                    db=int(url_db) if url_db else (db or 0),
                    connect_timeout=connect_timeout,
                )
            if scheme == "redis+sentinel":
                sentinels = tuple(_host_port(item) for item in parts.netloc.rpartition("@")[2].split(",") if item)
                segments = [unquote(segment) for segment in parts.path.split("/") if segment]
                if not sentinels or not segments:
                    raise ValueError("use redis+sentinel://host:26379,host:26380/<service name>[/db]")
                url_db = segments[1] if len(segments) > 1 else query.get("db")
                return cls(
                    host=sentinels[0][0],
                    port=sentinels[0][1],
                    username=username or None,
                    password=url_password or password,
                    db=int(url_db) if url_db else (db or 0),
                    connect_timeout=connect_timeout,
                    sentinels=sentinels,
                    service=segments[0],
                )
            if scheme not in ("redis", "rediss"):
                raise ValueError(
                    "use redis://host:port/db, rediss://... (TLS), redis+sentinel://host:26379,.../service "
                    "or unix:///path/to/redis.sock"
                )
            path_db = parts.path.strip("/")
            url_db = path_db or query.get("db")
            if scheme == "rediss" and ssl_context is None:
                ssl_context = client_context(ssl_ca_certs, ssl_certfile, ssl_keyfile)
            return cls(
                host=parts.hostname or "localhost",
                port=parts.port or DEFAULT_PORT,
                username=username or None,
                password=url_password or password,
                db=int(url_db) if url_db else (db or 0),
                ssl_context=ssl_context if scheme == "rediss" else None,
                connect_timeout=connect_timeout,
            )
        except ConfigError:  # not an invalid URL: TLS refused by require_tls, or a certificate file (named)
            raise
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: {exc}") from None

    @property
    def address(self) -> str:
        """Where the server is, for messages: ``host:port`` or the socket path (never credentials)."""
        if self.path is not None:
            return f"unix://{self.path}"
        if self.sentinels:
            hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels)
            return f"redis+sentinel://{hosts}/{self.service}/{self.db}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{'rediss' if self.ssl_context else 'redis'}://{host}:{self.port}/{self.db}"

    def __str__(self) -> str:
        return self.address


SENTINEL_PORT = 26379


def _host_port(item: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` (port 26379) of a sentinel list."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        return host, int(rest.lstrip(":") or SENTINEL_PORT)
    host, colon, port = item.rpartition(":")
    return (host, int(port)) if colon else (item, SENTINEL_PORT)


def _check_tls(url: str, scheme: str, query: dict[str, str], *, require_tls: bool, configured: bool) -> None:
    """Refuse TLS options in the URL, and ``redis://`` under ``require_tls``; warn of certificates left unused.

    Raises:
        ValueError: the URL has TLS options (``?ssl_cert_reqs=none`` ...).
        ConfigError: ``require_tls`` is on and the URL is ``redis://``.
    """
    options = sorted(k for k in query if k.lower().startswith(("ssl", "tls")))
    if options:
        raise ValueError(
            f"TLS options in the URL ({', '.join(options)}) are not supported: certificates are always verified "
            f"and there is no way to turn that off; set {CA_CERTS}, {CERTFILE} and {KEYFILE} instead"
        )
    if scheme in ("redis", "redis+sentinel") and require_tls:
        raise ConfigError(
            f"{REQUIRE_TLS} is on and {redact_url(url)!r} is not encrypted: use rediss:// "
            "(or a unix:// socket on this machine)"
        )
    if scheme != "rediss" and configured:
        logger.warning(
            "TLS certificates are configured but %s is not a rediss:// URL: the connection is not encrypted",
            redact_url(url),
        )
