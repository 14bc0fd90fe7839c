"""Documents to ingest: files from a local folder, as text blocks under their headings.

Markdown (markdown-it-py), plain text, HTML (the standard library's parser), PDF (pypdf)
and DOCX (python-docx). A file that cannot be used (binary, empty, too large,
unreadable, of an unsupported type) is skipped with a reason, never half-ingested.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Block",
    "SkippedFile",
    "SourceDocument",
    "UnchangedDocument",
    "extract",
    "scan_folder",
]

SUPPORTED_SUFFIXES = frozenset({".md", ".markdown", ".txt", ".text", ".html", ".htm", ".pdf", ".docx"})
_DOMAIN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Block:
    """A run of text under one heading (``heading`` is the path of headings, ``" > "``-joined; ``page`` for PDFs)."""

    heading: str
    text: str
    page: int | None = None


@dataclass(slots=True)
class SourceDocument:
    """One document to ingest: where it is, its domain, a version that changes with its content, its text."""

    source_id: str
    """Stable id: ``file:<absolute path>`` or ``gdrive:<file id>``."""
    location: str
    """A file path or a Drive link, shown with every result."""
    title: str
    domain: str
    version: str
    """Changes when the content changes (a sha256 for files, ``modifiedTime`` for Drive)."""
    blocks: list[Block] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class UnchangedDocument:
    """A document a source found unchanged (same version as stored) without reading its content."""

    source_id: str
    location: str


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A file that was not ingested, and why.

    With ``source_id`` (a file that is still there but could not be used this time) its
    stored copy is kept; without, a stored copy is removed like that of a deleted file.
    ``incomplete``: a whole folder could not be listed, so an ingest removes nothing.
    """

    location: str
    reason: str
    source_id: str | None = None
    incomplete: bool = False


def normalise_domain(value: str) -> str | None:
    """``value`` as a domain name (lower case, ``a-z0-9_-``), or ``None`` when it cannot be one."""
    domain = value.strip().casefold().replace(" ", "_")
    return domain if _DOMAIN.fullmatch(domain) else None


# -- extraction --------------------------------------------------------------------------


def _markdown_blocks(text: str) -> tuple[str | None, list[Block]]:
    """Blocks of the lines between headings; headings found by markdown-it (not inside code, say)."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").parse(text)
    lines = text.splitlines()
    headings: list[tuple[int, int, int, str]] = []  # (first line, end line, level, text)
    for index, token in enumerate(tokens):
        if token.type == "heading_open" and token.map is not None and index + 1 < len(tokens):
            headings.append((token.map[0], token.map[1], int(token.tag[1:]), tokens[index + 1].content.strip()))
    title = next((h[3] for h in headings if h[2] == 1 and h[3]), None)
    blocks: list[Block] = []
    path: list[tuple[int, str]] = []
    starts = [(0, 0, 0, "")] + headings  # a pseudo-heading for any text before the first one
    for number, (_, body_start, level, heading) in enumerate(starts):
        if number:
            path[:] = [p for p in path if p[0] < level] + [(level, heading)]
        body_end = starts[number + 1][0] if number + 1 < len(starts) else len(lines)
        body = "\n".join(lines[body_start:body_end]).strip()
        if body:
            blocks.append(Block(" > ".join(h for _, h in path), body))
    return title, blocks


def _text_blocks(text: str) -> list[Block]:
    return [Block("", p.strip()) for p in re.split(r"\n\s*\n", text) if p.strip()]


class _HtmlText(HTMLParser):
    """Collects text under h1-h6 headings; ignores script, style and other non-text elements."""

    _SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head"})
    _BREAKS = frozenset({"p", "div", "li", "br", "tr", "section", "article", "pre", "blockquote", "table"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title: str | None = None
        self.blocks: list[Block] = []
        self._path: list[tuple[int, str]] = []
        self._body: list[str] = []
        self._heading: list[str] | None = None
        self._heading_level = 0
        self._skipping = 0
        self._in_title = False
        self._doc_title: list[str] = []

    def _flush(self) -> None:
        text = re.sub(r"[ \t]+", " ", "".join(self._body))
        text = re.sub(r"\s*\n\s*", "\n", text).strip()
        if text:
            self.blocks.append(Block(" > ".join(h for _, h in self._path), text))
        self._body.clear()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
            self._in_title = self._in_title or False
        if tag == "title":
            self._in_title = True
        if re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self._heading, self._heading_level = [], int(tag[1])
        elif tag in self._BREAKS:
            self._body.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        if tag == "title":
            self._in_title = False
        if re.fullmatch(r"h[1-6]", tag) and self._heading is not None:
            heading = " ".join("".join(self._heading).split())
            level = self._heading_level
            if self.title is None and level == 1 and heading:
                self.title = heading
            self._path[:] = [p for p in self._path if p[0] < level] + [(level, heading)]
            self._heading = None
        elif tag in self._BREAKS:
            self._body.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._doc_title.append(data)
        if self._skipping:
            return
        if self._heading is not None:
            self._heading.append(data)
        else:
            self._body.append(data)

    def close(self) -> None:
        super().close()
        self._flush()
        if self.title is None and "".join(self._doc_title).strip():
            self.title = " ".join("".join(self._doc_title).split())


def _pdf_blocks(path: Path) -> list[Block]:
    from pypdf import PdfReader

    reader = PdfReader(path)
    blocks: list[Block] = []
    for number, page in enumerate(reader.pages, start=1):
        text = page.extract_text() or ""
        blocks.extend(Block("", p.strip(), page=number) for p in re.split(r"\n\s*\n", text) if p.strip())
    return blocks


def _docx_blocks(path: Path) -> tuple[str | None, list[Block]]:
    import docx

    document = docx.Document(str(path))
    title: str | None = None
    path_: list[tuple[int, str]] = []
    blocks: list[Block] = []
    body: list[str] = []

    def flush() -> None:
        if body:
            blocks.append(Block(" > ".join(h for _, h in path_), "\n".join(body)))
            body.clear()

    for paragraph in document.paragraphs:
        text = paragraph.text.strip()
        if not text:
            continue
        style = (paragraph.style.name if paragraph.style is not None else "") or ""
        match = re.fullmatch(r"Heading (\d)", style)
        if match or style == "Title":
            flush()
            level = int(match.group(1)) if match else 1
            if title is None and level == 1:
                title = text
            path_[:] = [p for p in path_ if p[0] < level] + [(level, text)]
        else:
            body.append(text)
    flush()
    return title, blocks


def _decode_text(raw: bytes) -> str:
    """Text of a text file; raises ValueError for binary content."""
    if b"\x00" in raw[:8192]:
        raise ValueError("binary content (NUL bytes) in a text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None


def extract(path: Path, raw: bytes) -> tuple[str | None, list[Block]]:
    """The title (if the document names one) and text blocks of a file's bytes, by its suffix.

    Raises:
        ValueError: the content is not what the suffix says, or has no text.
    """
    suffix = path.suffix.casefold()
    title: str | None = None
    blocks: list[Block]
    if suffix in {".md", ".markdown"}:
        title, blocks = _markdown_blocks(_decode_text(raw))
    elif suffix in {".txt", ".text"}:
        blocks = _text_blocks(_decode_text(raw))
    elif suffix in {".html", ".htm"}:
        parser = _HtmlText()
        parser.feed(_decode_text(raw))
        parser.close()
        title, blocks = parser.title, parser.blocks
    elif suffix == ".pdf":
        blocks = _pdf_blocks(path)
    elif suffix == ".docx":
        title, blocks = _docx_blocks(path)
    else:
        raise ValueError(f"unsupported file type {suffix or '(none)'}")
    if not any(b.text.strip() for b in blocks):
        raise ValueError("no text in it")
    return title, blocks


def _title_from_name(path: Path) -> str:
    return path.stem.replace("_", " ").replace("-", " ").strip().capitalize() or path.name


def _list_files(root: Path) -> tuple[list[Path], list[OSError]]:
    """Every file under ``root`` (not in hidden folders), and the folders that could not be listed."""
    if root.is_file():
        return [root], []
    files: list[Path] = []
    unlisted: list[OSError] = []
    for folder, folders, names in os.walk(root, onerror=unlisted.append):  # rglob would hide such errors
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        files += [Path(folder) / name for name in names if not name.startswith(".")]
    return sorted(files), unlisted


def _domain_of(relative: Path, domain: str | None) -> str:
    """The domain of a file at ``relative`` (``domain`` if given); raises ValueError saying why it has none."""
    if domain is not None:
        found = normalise_domain(domain)
        if found is None:
            raise ValueError(f"invalid domain {domain!r} (letters, digits, _ and -)")
        return found
    if len(relative.parts) < 2:
        raise ValueError("no domain: ingest the folder above it (each sub-folder is a domain), or pass --domain NAME")
    found = normalise_domain(relative.parts[0])
    if found is None:
        raise ValueError(f"folder name {relative.parts[0]!r} is not a domain name")
    return found


def _read(path: Path, max_file_bytes: int) -> bytes | SkippedFile:
    """The file's bytes, or why not."""
    location = str(path)
    if path.suffix.casefold() not in SUPPORTED_SUFFIXES:
        return SkippedFile(location, f"unsupported file type {path.suffix or '(none)'}")
    try:
        size = path.stat().st_size
        if size > max_file_bytes:
            return SkippedFile(location, f"too large: {size} bytes, limit {max_file_bytes}")
        raw = path.read_bytes()
    except OSError as exc:  # not readable this time: its stored copy is kept
        return SkippedFile(location, f"unreadable: {exc.strerror or exc}", source_id=f"file:{path.as_posix()}")
    return raw if raw.strip() else SkippedFile(location, "empty")


def scan_folder(
    root: Path, *, domain: str | None = None, max_file_bytes: int = 20_000_000
) -> Iterator[SourceDocument | SkippedFile]:
    """The documents under ``root`` (a folder or one file), each read and extracted, or why it was skipped.

    Without ``domain`` a file's domain is the name of its first sub-folder under ``root``;
    files directly in ``root`` then have none and are skipped. Hidden files and folders are
    ignored. A folder that cannot be listed is reported ``incomplete`` (an ingest then
    removes nothing, since its files were not seen).
    """
    root = root.resolve()
    files, unlisted = _list_files(root)
    for error in unlisted:
        yield SkippedFile(str(error.filename), f"cannot list the folder: {error.strerror or error}", incomplete=True)
    base = root.parent if root.is_file() else root
    for path in files:
        location = str(path)
        source_id = f"file:{path.as_posix()}"  # a file skipped is still there: its stored copy (if any) stays
        try:
            doc_domain = _domain_of(path.relative_to(base), domain)
        except ValueError as exc:
            yield SkippedFile(location, str(exc), source_id=source_id)
            continue
        raw = _read(path, max_file_bytes)
        if isinstance(raw, SkippedFile):
            yield SkippedFile(raw.location, raw.reason, source_id=source_id)
            continue
        try:
            title, blocks = extract(path, raw)
        except Exception as exc:  # a parser's error on a broken file: skipped with its reason, never fatal
            yield SkippedFile(
                location, f"cannot extract text: {str(exc)[:200] or type(exc).__name__}", source_id=source_id
            )
            continue
        yield SourceDocument(
            source_id=f"file:{path.as_posix()}",
            location=location,
            title=title or _title_from_name(path),
            domain=doc_domain,
            version=hashlib.sha256(raw).hexdigest(),
            blocks=blocks,
        )
