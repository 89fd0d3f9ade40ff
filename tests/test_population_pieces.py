"""Large NDJSON files cut at line ends into pieces, each knowing its source and first line (no Spark)."""

from __future__ import annotations

import pytest

from fhir_plugin._population._pieces import Oversized, cut_large_files


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_a_large_file_is_cut_at_line_ends_and_a_small_one_read_as_it_is(tmp_path, trailing_newline):
    big, small = tmp_path / "Observation.ndjson", tmp_path / "Patient.ndjson"
    lines = [f'{{"resourceType":"Observation","id":"o{n}"}}' for n in range(200)]
    big.write_text("\n".join(lines) + ("\n" if trailing_newline else ""), encoding="utf-8")
    small.write_text('{"resourceType":"Patient","id":"p"}\n', encoding="utf-8")

    read, pieces, oversized = cut_large_files([big, small], tmp_path / "pieces", piece_bytes=1000)

    assert read[0] == small and read[1:] == [p.path for p in pieces] and len(pieces) > 5 and oversized == []
    assert all(p.source_name == "Observation.ndjson" for p in pieces)
    texts = [p.path.read_text(encoding="utf-8") for p in pieces]
    assert "".join(texts) == big.read_text(encoding="utf-8")  # nothing lost, nothing twice, in order
    assert all(t.endswith("\n") for t in texts[:-1])  # every piece but the last ends at a line end
    assert max(len(t) for t in texts) <= 1000 + max(len(x) for x in lines)  # its size, and at most a line more
    for piece, text in zip(pieces, texts, strict=True):
        assert text.split("\n")[0] == lines[piece.first_line - 1]  # its first line, numbered in the source


def test_a_line_longer_than_a_piece_is_left_out_and_reported_and_the_numbering_holds(tmp_path):
    source = tmp_path / "DocumentReference.ndjson"
    short = ['{"resourceType":"Patient","id":"a"}', '{"resourceType":"Patient","id":"b"}']
    long_line = '{"resourceType":"DocumentReference","data":"' + "x" * 5000 + '"}'
    source.write_text(f"{short[0]}\n{long_line}\n{short[1]}\n{long_line}", encoding="utf-8")  # the last: no newline
    folder = tmp_path / "pieces"
    folder.mkdir()
    (folder / "stale.piece").write_text("from an earlier run")

    _, pieces, oversized = cut_large_files([source], folder, piece_bytes=100)

    text = "".join(p.path.read_text(encoding="utf-8") for p in pieces)
    assert text.split("\n")[:3] == [short[0], "", short[1]]  # an empty line where the long one was
    assert oversized == [
        Oversized("DocumentReference.ndjson", 2, len(long_line) + 1),
        Oversized("DocumentReference.ndjson", 4, len(long_line)),
    ]
    assert sorted(folder.iterdir()) == sorted(p.path for p in pieces)  # the earlier run's piece is gone
