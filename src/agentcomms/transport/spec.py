"""Where a Redis server is and how to log in: parsed once from a URL and the settings."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from agentcomms.exceptions import ConfigError
from agentcomms.settings import redact_url

__all__ = ["ConnectionSpec"]

DEFAULT_PORT = 6379


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

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        password: str | None = None,
        username: str | None = None,
        db: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 5.0,
    ) -> ConnectionSpec:
        """Parse ``redis://[user[:password]@]host[:port][/db]``, ``rediss://...`` or ``unix:///path[?db=N]``.

        ``password``, ``username`` and ``db`` (``REDIS_PASSWORD``, ``REDIS_USERNAME``, ``REDIS_DB``) apply
        when the URL has none.

        Raises:
            ConfigError: the URL is not a Redis URL.
        """
        try:
            parts = urlsplit(url)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            scheme = parts.scheme.lower()
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
            if scheme not in ("redis", "rediss"):
                raise ValueError("use redis://host:port/db, rediss://... (TLS) or unix:///path/to/redis.sock")
            path_db = parts.path.strip("/")
            url_db = path_db or query.get("db")
            if scheme == "rediss" and ssl_context is None:
                ssl_context = ssl.create_default_context()
            return cls(
                host=parts.hostname or "localhost",
                port=parts.port or DEFAULT_PORT,
                username=username or None,
                password=url_password or password,
                db=int(url_db) if url_db else (db or 0),
                ssl_context=ssl_context if scheme == "rediss" else None,
                connect_timeout=connect_timeout,
            )
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: {exc}") from None

    @property
    def address(self) -> str:
        """Where the server is, for messages: ``host:port`` or the socket path (never credentials)."""
        if self.path is not None:
            return f"unix://{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{'rediss' if self.ssl_context else 'redis'}://{host}:{self.port}/{self.db}"

    def __str__(self) -> str:
        return self.address
