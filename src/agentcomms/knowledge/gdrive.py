"""Documents from Google Drive: the files of shared folders, each folder mapped to a knowledge domain.

A service account reads the folders shared with it (``GDRIVE_CONFIG_PATH`` names the config)::

    {"service_account_file": "key.json", "folders": {"<folder id>": "marketing"}, "max_file_bytes": 20000000}

Files are found through sub-folders; a file whose ``modifiedTime`` is the stored version is
not downloaded. Google Docs are exported as HTML; other Google types (Sheets, Slides, ...)
are skipped. Regular files go through :func:`~agentcomms.knowledge.sources.extract`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from agentcomms.exceptions import ConfigError
from agentcomms.knowledge.sources import (
    SUPPORTED_SUFFIXES,
    Block,
    SkippedFile,
    SourceDocument,
    UnchangedDocument,
    extract,
    normalise_domain,
)
from agentcomms.schemas import describe_errors

__all__ = ["DRIVE_SCOPES", "DriveConfig", "build_drive_service", "scan_drive"]

logger = logging.getLogger(__name__)

DRIVE_SCOPES = ("https://www.googleapis.com/auth/drive.readonly",)
"""What the service account asks for: read-only access to the files shared with it."""

FOLDER_TYPE = "application/vnd.google-apps.folder"
DOC_TYPE = "application/vnd.google-apps.document"
_GOOGLE_PREFIX = "application/vnd.google-apps."
_FIELDS = "id, name, mimeType, modifiedTime, size, webViewLink"
_KEY_FIELDS = ("client_email", "private_key", "token_uri")
_READ_BY_PATH = frozenset({".pdf", ".docx"})  # extract() opens these by path: they go through a temporary file

FolderId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,200}$")]


class DriveConfig(BaseModel):
    """The Drive source: the service account key file, folder id -> domain, and the largest file to read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service_account_file: Path
    """The service account's JSON key (relative paths are relative to the config file's folder)."""
    folders: dict[FolderId, str] = Field(min_length=1)
    """Drive folder id (the last part of its URL) -> the knowledge domain of everything under it."""
    max_file_bytes: int = Field(20_000_000, gt=0)

    @field_validator("folders")
    @classmethod
    def _domains(cls, value: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for folder_id, domain in value.items():
            normalised = normalise_domain(domain)
            if normalised is None:
                raise ValueError(f"folder {folder_id}: {domain!r} is not a domain name (letters, digits, _ and -)")
            out[folder_id] = normalised
        return out

    @classmethod
    def load(cls, path: str | Path) -> DriveConfig:
        """The config in the JSON file at ``path`` (``GDRIVE_CONFIG_PATH``).

        Raises:
            ConfigError: the file cannot be read, is not JSON, or its fields are wrong.
        """
        path = Path(path).expanduser()
        where = f"Google Drive config {path}"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read the {where}: {exc.strerror or type(exc).__name__}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"the {where} is not UTF-8 text") from None
        except json.JSONDecodeError as exc:  # the message names a position, never the content
            raise ConfigError(f"the {where} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        if isinstance(data, dict) and "private_key" in data:
            raise ConfigError(
                f"the {where} looks like a service account key: point its service_account_file at the key instead"
            )
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:  # messages and field names only, never the input values
            raise ConfigError(f"the {where} is invalid: {describe_errors(exc)}") from None
        key = config.service_account_file.expanduser()
        return config.model_copy(update={"service_account_file": key if key.is_absolute() else path.parent / key})

    def service_account_email(self) -> str | None:
        """The service account's email (``client_email`` of its key), to share folders with; ``None`` if unreadable."""
        try:
            email = json.loads(self.service_account_file.read_text(encoding="utf-8")).get("client_email")
        except (OSError, ValueError, AttributeError):
            return None
        return email if isinstance(email, str) and email else None


def build_drive_service(config: DriveConfig) -> Any:
    """The Drive v3 API as the service account (its discovery document comes from the package: no network here).

    Raises:
        ConfigError: the key file cannot be read or is not a service account key.
    """
    from google.oauth2 import service_account
    from googleapiclient.discovery import build

    key = config.service_account_file
    where = f"service account key file {key}"
    try:
        info = json.loads(key.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the {where}: {exc.strerror or type(exc).__name__}") from None
    except ValueError:
        raise ConfigError(f"the {where} is not a JSON key") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ConfigError(f"the {where} is not a service account key (its type must be service_account)")
    missing = [name for name in _KEY_FIELDS if not info.get(name)]
    if missing:
        raise ConfigError(f"the {where} lacks {', '.join(missing)}: download a new JSON key for the service account")
    try:
        credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=list(DRIVE_SCOPES)
        )
    except Exception as exc:  # whatever the key parser says may quote the key: only its type is told
        raise ConfigError(f"the private key in the {where} cannot be used ({type(exc).__name__})") from None
    return build("drive", "v3", credentials=credentials, cache_discovery=False, static_discovery=True)


def _http_reason(exc: Any) -> str:
    """``HTTP <status>: <Drive's message>`` of a googleapiclient ``HttpError``; else the error's kind and text."""
    if hasattr(exc, "status_code") and hasattr(exc, "reason"):
        return f"HTTP {exc.status_code}: {str(exc.reason)[:200] or 'no message'}"
    return f"{type(exc).__name__}: {str(exc)[:200] or 'no message'}"  # the network, the token refresh ...


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a Drive call raises when Drive, the network or the credentials fail."""
    from google.auth.exceptions import GoogleAuthError
    from googleapiclient.errors import Error as GoogleApiError

    return (GoogleApiError, GoogleAuthError, OSError, TimeoutError)


def _folder_link(folder_id: str) -> str:
    return f"https://drive.google.com/drive/folders/{folder_id}"


def _list_children(service: Any, folder_id: str, retries: int) -> Iterator[dict[str, Any]]:
    """The files and folders directly in ``folder_id``, page by page."""
    token: str | None = None
    while True:
        request = service.files().list(
            q=f"'{folder_id}' in parents and trashed = false",
            fields=f"nextPageToken, files({_FIELDS})",
            pageSize=1000,
            pageToken=token,
            supportsAllDrives=True,
            includeItemsFromAllDrives=True,
        )
        page = request.execute(num_retries=retries)
        yield from page.get("files", [])
        token = page.get("nextPageToken")
        if not token:
            return


def _extract(suffix: str, raw: bytes) -> tuple[str | None, list[Block]]:
    """:func:`extract` of downloaded bytes; PDF and DOCX through a temporary file, since their readers take a path."""
    if suffix not in _READ_BY_PATH:
        return extract(Path(f"document{suffix}"), raw)
    with tempfile.TemporaryDirectory(prefix="agentcomms-gdrive-") as folder:
        path = Path(folder) / f"document{suffix}"
        path.write_bytes(raw)
        return extract(path, raw)


def _read_file(
    service: Any, item: Mapping[str, Any], domain: str, root: str, max_bytes: int, retries: int
) -> SourceDocument | SkippedFile:
    """One Drive file downloaded (or exported) and extracted, or why not."""
    file_id, name, mime = str(item["id"]), str(item.get("name", "")), str(item.get("mimeType", ""))
    location = _location(item)
    if mime == DOC_TYPE:
        suffix, title = ".html", name
        request = service.files().export_media(fileId=file_id, mimeType="text/html")
    elif mime.startswith(_GOOGLE_PREFIX):
        return SkippedFile(location, f"unsupported Google type {mime.removeprefix(_GOOGLE_PREFIX)} ({mime})")
    else:
        suffix = PurePosixPath(name).suffix.casefold()
        title = name[: -len(suffix)] if suffix else name
        if suffix not in SUPPORTED_SUFFIXES:
            return SkippedFile(location, f"unsupported file type {suffix or '(none)'}")
        size = int(item.get("size") or 0)
        if size > max_bytes:
            return SkippedFile(location, f"too large: {size} bytes, limit {max_bytes}")
        request = service.files().get_media(fileId=file_id, supportsAllDrives=True)
    try:
        raw: bytes = request.execute(num_retries=retries)
    except _transport_errors() as exc:
        return SkippedFile(location, f"cannot download: {_http_reason(exc)}", source_id=f"gdrive:{file_id}")
    if len(raw) > max_bytes:
        return SkippedFile(location, f"too large: {len(raw)} bytes, limit {max_bytes}")
    if not raw.strip():
        return SkippedFile(location, "empty")
    try:
        extracted_title, blocks = _extract(suffix, raw)
    except Exception as exc:  # a parser's error on a broken file: skipped with its reason, never fatal
        return SkippedFile(location, f"cannot extract text: {str(exc)[:200] or type(exc).__name__}")
    logger.debug("gdrive: read %s (%d bytes, %d blocks)", location, len(raw), len(blocks))
    return SourceDocument(
        source_id=f"gdrive:{file_id}",
        location=location,
        title=title or extracted_title or file_id,
        domain=domain,
        version=drive_version(str(item["modifiedTime"]), domain, root),
        blocks=blocks,
    )


def drive_version(modified: str, domain: str, root: str) -> str:
    """A Drive document's version: its ``modifiedTime``, domain and configured folder.

    Moved to another domain: read again; the folder tells an ingest of one config which
    stored files are its own (those of another config are not removed).
    """
    return f"{modified}@{domain}@{root}"


def drive_root(version: str) -> str:
    """The configured folder id in a version made by :func:`drive_version` (``""`` if none)."""
    parts = version.split("@")
    return parts[2] if len(parts) == 3 else ""


def _folder_problem(config: DriveConfig, folder_id: str, exc: Any) -> SkippedFile:
    reason = f"cannot list the folder: {_http_reason(exc)}"
    if getattr(exc, "status_code", None) in {403, 404}:
        email = config.service_account_email() or "the service account (client_email in its key file)"
        reason += f"; share the folder with {email}"
    logger.warning("gdrive: folder %s skipped: %s", folder_id, reason)
    return SkippedFile(_folder_link(folder_id), reason, incomplete=True)  # so nothing stored is removed


def _location(item: Mapping[str, Any]) -> str:
    return str(item.get("webViewLink") or f"gdrive:{item.get('name', item['id'])}")


def _file_result(
    service: Any,
    item: Mapping[str, Any],
    root: str,
    known: Mapping[str, str],
    config: DriveConfig,
    retries: int,
) -> SourceDocument | SkippedFile | UnchangedDocument:
    source_id, modified = f"gdrive:{item['id']}", item.get("modifiedTime")
    if not modified:
        return SkippedFile(_location(item), "Drive gave no modifiedTime for it", source_id=source_id)
    domain = config.folders[root]
    if known.get(source_id) == drive_version(str(modified), domain, root):
        return UnchangedDocument(source_id, _location(item))
    return _read_file(service, item, domain, root, config.max_file_bytes, retries)


def _scan_tree(
    service: Any, config: DriveConfig, root: str, known: Mapping[str, str], retries: int, visited: set[str]
) -> Iterator[SourceDocument | SkippedFile | UnchangedDocument]:
    """The files under the configured folder ``root``, breadth first; ``visited``: the Drive ids met so far."""
    pending = deque([root])
    while pending:
        folder_id = pending.popleft()
        if folder_id in visited:
            continue
        visited.add(folder_id)
        try:
            if folder_id == root:  # a folder not shared with the account is a 404 here, whatever list would say
                folder = service.files().get(fileId=root, fields="id, mimeType", supportsAllDrives=True)
                mime = folder.execute(num_retries=retries).get("mimeType")
                if mime != FOLDER_TYPE:
                    yield SkippedFile(_folder_link(root), f"not a folder but a file of type {mime}")
                    continue
            for item in _list_children(service, folder_id, retries):
                item_id = str(item["id"])
                if item.get("mimeType") == FOLDER_TYPE:
                    if item_id not in config.folders:  # a configured sub-folder is scanned with its own domain
                        pending.append(item_id)
                elif item_id not in visited:  # a file with two parents is read once
                    visited.add(item_id)
                    yield _file_result(service, item, root, known, config, retries)
        except _transport_errors() as exc:
            yield _folder_problem(config, folder_id, exc)


def scan_drive(
    service: Any, config: DriveConfig, known: Mapping[str, str], *, retries: int = 3
) -> Iterator[SourceDocument | SkippedFile | UnchangedDocument]:
    """The files under the configured folders (and their sub-folders), read, or unchanged, or why they were skipped.

    Args:
        service: the Drive v3 API (:func:`build_drive_service`).
        config: the folders and their domains.
        known: source id -> stored version: a file with that ``modifiedTime`` is not downloaded.
            Leave out documents whose folder's domain changed, so that they are stored again.
        retries: how many times a request is retried on a rate limit or a server error.

    A sub-folder that is itself configured keeps its own domain; a file met twice is read once.

    Yields:
        A :class:`SourceDocument` per file read, an :class:`UnchangedDocument` per file not downloaded,
        a :class:`SkippedFile` per file or folder that could not be used.
    """
    visited: set[str] = set()
    for root in config.folders:
        yield from _scan_tree(service, config, root, known, retries, visited)
