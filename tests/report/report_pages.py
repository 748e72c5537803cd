"""Parse a rendered report with html.parser into what the tests check: images, sections, notes, rows."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Page:
    images: list[str] = field(default_factory=list)
    """`src` of every <img>, in page order."""
    section_images: dict[str, list[str]] = field(default_factory=dict)
    section_text: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    """Text of each <p class="note" id="note-KEY">, by KEY."""
    rows: list[list[str]] = field(default_factory=list)
    """Text of the cells of every table row."""
    best_rows: list[list[str]] = field(default_factory=list)
    headline: str = ""


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = Page()
        self._section: str | None = None
        self._note: str | None = None
        self._in_headline = False
        self._row: list[str] | None = None
        self._row_is_best = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "section":
            self._section = attributes.get("id")
            self.page.section_images.setdefault(self._section, [])
            self.page.section_text.setdefault(self._section, "")
        elif tag == "img":
            self.page.images.append(attributes["src"])
            if self._section:
                self.page.section_images[self._section].append(attributes["src"])
        elif tag == "p" and "note" in classes and (attributes.get("id") or "").startswith("note-"):
            self._note = attributes["id"].removeprefix("note-")
            self.page.notes[self._note] = ""
        elif tag == "p" and "headline" in classes:
            self._in_headline = True
        elif tag == "tr":
            self._row, self._row_is_best = [], "best" in classes
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._section = None
        elif tag == "p":
            self._note, self._in_headline = None, False
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.page.rows.append(self._row)
            if self._row_is_best:
                self.page.best_rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._section:
            self.page.section_text[self._section] += data
        if self._note is not None:
            self.page.notes[self._note] += data
        if self._in_headline:
            self.page.headline += data
        if self._cell is not None:
            self._cell.append(data)


def parse_page(path: Path) -> Page:
    parser = _PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.page


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; raises AssertionError if the file is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} does not start with the PNG signature"
    assert data[12:16] == b"IHDR", f"{path} has no IHDR chunk first"
    width, height = struct.unpack(">II", data[16:24])
    return width, height
