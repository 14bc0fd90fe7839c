"""No Redis password in any output or log line of the CLI: the passwords it knows, scrubbed from what it writes."""

from __future__ import annotations

import io
import logging
import os
import sys
import traceback
from typing import TextIO
from urllib.parse import parse_qsl, unquote, urlsplit

from agentcomms.settings import redact_url


class Secrets:
    """The Redis passwords this process was given, and how to take them out of text it prints.

    Messages name URLs redacted already (:func:`redact_url`); this is the net under them,
    for text the CLI does not write itself: library errors, log lines, the demo's report.
    """

    def __init__(self) -> None:
        self._replacements: dict[str, str] = {}

    def add_url(self, url: str | None) -> None:
        """Know the password in ``url``, if it has one (as written and percent-decoded)."""
        if not url:
            return
        redacted = redact_url(url)
        if redacted != url:
            self._replacements[url] = redacted
        try:
            parts = urlsplit(url)
        except ValueError:
            return
        userinfo, at, _ = parts.netloc.rpartition("@")
        written = userinfo.partition(":")[2] if at else ""
        for password in (written, unquote(written)):
            if password:
                self._replacements[f":{password}@"] = ":***@"
                self.add_password(password)
        for name, value in parse_qsl(parts.query):
            if name == "password" and value:
                self._replacements[f"password={value}"] = "password=***"
                self.add_password(value)

    def add_password(self, password: str | None) -> None:
        """Know ``password``; it is replaced wherever it appears (if it is long enough to mean nothing else)."""
        if password and len(password) >= 4:
            self._replacements[password] = "***"

    def add_environment(self) -> None:
        """Know the passwords of ``REDIS_URL`` and ``REDIS_PASSWORD`` (any case, as Settings reads them)."""
        for name, value in os.environ.items():
            if name.upper() == "REDIS_URL":
                self.add_url(value)
            elif name.upper() == "REDIS_PASSWORD":
                self.add_password(value)

    def scrub(self, text: str) -> str:
        """``text`` without any known password."""
        for secret in sorted(self._replacements, key=len, reverse=True):  # whole URLs before bare passwords
            if secret in text:
                text = text.replace(secret, self._replacements[secret])
        return text


secrets = Secrets()


class ScrubbedStream(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` (looked up at each write), with known passwords taken out."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property
    def _stream(self) -> TextIO:
        stream: TextIO = getattr(sys, self._name)
        return stream

    def write(self, text: str) -> int:
        self._stream.write(secrets.scrub(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]  # TextIOBase's is a plain attribute
        return self._stream.encoding


def scrub_record(record: logging.LogRecord) -> bool:
    """Take passwords out of a log record's message and traceback before it is rendered."""
    text = record.getMessage()
    if record.exc_info:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        record.exc_info = record.exc_text = None
    record.msg, record.args = secrets.scrub(text), None
    return True
