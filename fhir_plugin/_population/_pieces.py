"""Large NDJSON files cut at line ends into pieces the job can read whole, each knowing its first line.

The job reads every file whole (``wholetext``) so a problem can name its file and
line.  A whole file is one string in an executor's heap, split into lines beside it:
a file of a gigabyte (one file per resource type, as Synthea and some bulk tools
write) ran the local JVM out of memory, and past 2 GB no JVM string holds it.  So a
file larger than ``PIECE_BYTES`` is copied into pieces of about that size, each
ending at a line end; the job reads the pieces and numbers their lines from the
piece's first line, under the original file's name.  Smaller files are read as they
are.  A line longer than ``PIECE_BYTES`` (in a file that large) is not copied: an
empty line keeps the numbering, and the line is reported.  Files only: no Spark here.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

__all__ = ["PIECE_BYTES", "Piece", "Oversized", "cut_large_files"]

#: files above this are cut into pieces of about this size (and lines above it are not read).  Splitting a
#: whole file into lines copies it as UTF-16 text twice over in the executor's heap: a 966 MB file read
#: whole, and in pieces of 64 MB, ran the local JVM (1 GB heap, two tasks) out of memory; in pieces of
#: 16 MB its 100,000 patients were checked at the speed of the same lines in 100 files of 10 MB
PIECE_BYTES = 16 * 1024 * 1024
_BLOCK = 8 * 1024 * 1024
#: what a piece's name ends with: never a name the job reads as input (``ndjson_files`` takes ``.ndjson``)
_SUFFIX = ".piece"


@dataclass(frozen=True)
class Piece:
    """One piece of a large file: where it is, which file it came from, and the line it starts at (1-based)."""

    path: Path
    source_name: str
    first_line: int


@dataclass(frozen=True)
class Oversized:
    """A line too long to read, left out of the pieces: its file, line number and length in bytes."""

    source_name: str
    line: int
    size: int


def cut_large_files(
    files: Sequence[Path], folder: Path, piece_bytes: int = PIECE_BYTES
) -> tuple[list[Path], list[Piece], list[Oversized]]:
    """The paths to read (small files as they are, then the pieces), the pieces, and the lines left out.

    ``folder`` is emptied first: it holds the pieces of one run only.
    """
    shutil.rmtree(folder, ignore_errors=True)
    whole: list[Path] = []
    pieces: list[Piece] = []
    oversized: list[Oversized] = []
    for number, path in enumerate(files):
        if path.stat().st_size <= piece_bytes:
            whole.append(path)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        cutter = _Cutter(path.name, folder, f"{number:05d}", piece_bytes)
        with open(path, "rb") as source:
            cutter.cut(source)
        pieces += cutter.pieces
        oversized += cutter.oversized
    return whole + [p.path for p in pieces], pieces, oversized


@dataclass
class _Cutter:
    """One file's cutting, a block at a time: only a line that crosses blocks can be over the limit."""

    source_name: str
    folder: Path
    prefix: str
    piece_bytes: int
    pieces: list[Piece] = field(default_factory=list)
    oversized: list[Oversized] = field(default_factory=list)
    _out: BinaryIO | None = None
    _written: int = 0
    _line: int = 1  # the number of the line whose bytes come next
    _line_bytes: int = 0  # of the current line so far (written, or skipped once over the limit)

    def cut(self, source: BinaryIO) -> None:
        # blocks no larger than a piece: a line inside one (between two of its newlines) is within the limit
        while block := source.read(min(_BLOCK, self.piece_bytes)):
            first = block.find(b"\n")
            if first < 0:
                self._continue_line(block, ends=False)
                continue
            self._continue_line(block[: first + 1], ends=True)
            last = block.rfind(b"\n")
            self._write_lines(block[first + 1 : last + 1])
            self._end_piece_if_full()
            if last + 1 < len(block):
                self._continue_line(block[last + 1 :], ends=False)
        if self._line_bytes > self.piece_bytes:  # the last line, without a newline, was too long
            self.oversized.append(Oversized(self.source_name, self._line, self._line_bytes))
        self._close()

    def _continue_line(self, part: bytes, *, ends: bool) -> None:
        """More of the current line (to its newline when ``ends``); a line over the limit is dropped."""
        before = self._line_bytes
        self._line_bytes += len(part)
        if self._line_bytes <= self.piece_bytes:
            self._write(part)
        elif before <= self.piece_bytes and before:
            self._unwrite(before)  # the line's start is in this piece (pieces end at line ends)
        if ends:
            if self._line_bytes > self.piece_bytes:
                self.oversized.append(Oversized(self.source_name, self._line, self._line_bytes))
                self._write(b"\n")  # an empty line in its place keeps the numbering
            self._line += 1
            self._line_bytes = 0
            self._end_piece_if_full()

    def _write_lines(self, data: bytes) -> None:
        """Whole lines, each within the limit, spread over pieces so that none grows past its size by more
        than a line."""
        while data:
            room = self.piece_bytes - self._written if self._out is not None else self.piece_bytes
            cut = len(data) if len(data) <= room else data.rfind(b"\n", 0, room) + 1 or data.find(b"\n") + 1
            self._write(data[:cut])
            self._line += data.count(b"\n", 0, cut)
            data = data[cut:]
            if data:
                self._close()

    def _write(self, data: bytes) -> None:
        if self._out is None:
            # named by number only: Spark's input_file_name() escapes some characters a source's name may have
            path = self.folder / f"{self.prefix}.{len(self.pieces):05d}{_SUFFIX}"
            self._out = open(path, "wb")  # noqa: SIM115 - closed by _close, when the piece is full or at the end
            self.pieces.append(Piece(path, self.source_name, self._line))
            self._written = 0
        self._out.write(data)
        self._written += len(data)

    def _unwrite(self, size: int) -> None:
        assert self._out is not None
        self._written -= size
        self._out.seek(self._written)
        self._out.truncate()

    def _end_piece_if_full(self) -> None:
        if self._written >= self.piece_bytes and self._line_bytes == 0:
            self._close()

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
