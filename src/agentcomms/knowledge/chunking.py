"""Cutting documents into chunks that respect headings.

Text under one heading stays together up to ``max_words``; a longer section is cut at
sentence ends with a little overlap; a chunk never spans two headings. Each chunk keeps
its heading path and position, shown with every search result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agentcomms.knowledge.sources import SourceDocument

__all__ = ["Chunk", "chunk_document"]

_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+|(?<=[。！？])|\n+")


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a document: its text, the headings above it, its position (0-based) and PDF page."""

    text: str
    heading: str
    position: int
    page: int | None = None

    def embedding_text(self, title: str) -> str:
        """What is embedded: the document's title and the heading path give a chunk its context."""
        context = " > ".join(part for part in (title, self.heading) if part)
        return f"{context}\n{self.text}" if context else self.text


_LONGEST_WORD = 40
"""Characters of one "word" at most: text without spaces (Chinese, Japanese, a long URL) is cut in such runs."""


def _words(sentence: str) -> list[str]:
    words: list[str] = []
    for word in sentence.split():
        words += [word[i : i + _LONGEST_WORD] for i in range(0, len(word), _LONGEST_WORD)]
    return words


def _pieces(text: str, max_words: int, overlap: int) -> list[str]:
    """``text`` cut at sentence ends into pieces of at most ``max_words`` words (a longer sentence is cut)."""
    words_of = [_words(s) for s in _SENTENCE_END.split(text) if s.strip()]
    sentences: list[list[str]] = []
    for words in words_of:
        for i in range(0, len(words), max_words):
            sentences.append(words[i : i + max_words])
    pieces: list[str] = []
    current: list[list[str]] = []
    count = 0
    for sentence in sentences:
        if current and count + len(sentence) > max_words:
            pieces.append(" ".join(" ".join(s) for s in current))
            kept: list[list[str]] = []  # the last sentences, up to ``overlap`` words, start the next piece
            kept_words = 0
            for previous in reversed(current):
                if kept_words + len(previous) > overlap:
                    break
                kept.insert(0, previous)
                kept_words += len(previous)
            current, count = kept, kept_words
        current.append(sentence)
        count += len(sentence)
    if current:
        pieces.append(" ".join(" ".join(s) for s in current))
    return pieces


def chunk_document(document: SourceDocument, *, max_words: int = 150, overlap: int = 25) -> list[Chunk]:
    """The chunks of ``document`` in order."""
    grouped: list[tuple[str, int | None, list[str]]] = []  # consecutive blocks of one heading (and page)
    for block in document.blocks:
        if grouped and grouped[-1][0] == block.heading and grouped[-1][1] == block.page:
            grouped[-1][2].append(block.text)
        else:
            grouped.append((block.heading, block.page, [block.text]))
    chunks: list[Chunk] = []
    title = document.title
    for heading, page, texts in grouped:
        if heading == title or heading.startswith(title + " > "):  # the title is said once, not again as a heading
            heading = heading[len(title) :].removeprefix(" > ")
        for piece in _pieces("\n".join(texts), max_words, overlap):
            chunks.append(Chunk(piece, heading, len(chunks), page))
    return chunks
