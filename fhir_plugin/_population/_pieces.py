"""Large NDJSON files cut at line ends into pieces the job can read whole, each knowing its first line.

The job reads every file whole (``wholetext``) so a problem can name its file and
line.  A whole file is one string in an executor's heap, split into lines beside it:
a file of a gigabyte (one file per resource type, as Synthea and some bulk tools
write) ran the local JVM out of memory, and past 2 GB no JVM string holds it.  So a
file larger than ``PIECE_BYTES`` is copied into pieces of about that size, each
ending at a line end; the job reads the pieces and numbers their lines from the
piece's first line, under the original file's name.  Smaller files are read as they
are.  Files only: no Spark here.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PIECE_BYTES", "Piece", "cut_large_files"]

#: files above this are cut; a piece is this size, and then to the end of the line it reached.  Splitting a
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


def cut_large_files(
    files: Sequence[Path], folder: Path, piece_bytes: int = PIECE_BYTES
) -> tuple[list[Path], list[Piece]]:
    """The paths to read (small files as they are, then the pieces) and the pieces, cut into ``folder``.

    ``folder`` is emptied first: it holds the pieces of one run only.
    """
    shutil.rmtree(folder, ignore_errors=True)
    whole: list[Path] = []
    pieces: list[Piece] = []
    for number, path in enumerate(files):
        if path.stat().st_size <= piece_bytes:
            whole.append(path)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        pieces += _cut(path, folder, f"{number:05d}", piece_bytes)
    return whole + [p.path for p in pieces], pieces


def _cut(source: Path, folder: Path, prefix: str, piece_bytes: int) -> list[Piece]:
    """``source`` as pieces of ``piece_bytes`` and then to the end of the line; each piece's first line."""
    pieces: list[Piece] = []
    first_line = 1
    with open(source, "rb") as src:
        while True:
            # named by number only: Spark's input_file_name() escapes some characters a source's name may have
            path = folder / f"{prefix}.{len(pieces):05d}{_SUFFIX}"
            written = newlines = 0
            with open(path, "wb") as out:
                while written < piece_bytes:
                    block = src.read(min(_BLOCK, piece_bytes - written))
                    if not block:
                        break
                    out.write(block)
                    written += len(block)
                    newlines += block.count(b"\n")
                if written >= piece_bytes:
                    rest = src.readline()  # the piece ends at a line end, however long that line
                    out.write(rest)
                    written += len(rest)
                    newlines += rest.count(b"\n")
            if not written:
                path.unlink()
                return pieces
            pieces.append(Piece(path, source.name, first_line))
            first_line += newlines
