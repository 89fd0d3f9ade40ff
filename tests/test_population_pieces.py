"""Large NDJSON files cut at line ends into pieces, each knowing its source and first line (no Spark)."""

from __future__ import annotations

from fhir_plugin._population._pieces import cut_large_files


def test_a_large_file_is_cut_at_line_ends_and_a_small_one_read_as_it_is(tmp_path):
    big, small = tmp_path / "Observation.ndjson", tmp_path / "Patient.ndjson"
    lines = [f'{{"resourceType":"Observation","id":"o{n}"}}' for n in range(200)]
    big.write_text("\n".join(lines), encoding="utf-8")  # no newline after the last line
    small.write_text('{"resourceType":"Patient","id":"p"}\n', encoding="utf-8")

    read, pieces = cut_large_files([big, small], tmp_path / "pieces", piece_bytes=1000)

    assert read[0] == small and read[1:] == [p.path for p in pieces] and len(pieces) > 5
    assert all(p.source_name == "Observation.ndjson" for p in pieces)
    texts = [p.path.read_text(encoding="utf-8") for p in pieces]
    assert "".join(texts) == big.read_text(encoding="utf-8")  # nothing lost, nothing twice, in order
    assert all(t.endswith("\n") for t in texts[:-1])  # every piece but the last ends at a line end
    for piece, text in zip(pieces, texts, strict=True):
        assert text.split("\n")[0] == lines[piece.first_line - 1]  # its first line, numbered in the source


def test_a_line_longer_than_a_piece_stays_whole_and_the_folder_holds_one_run(tmp_path):
    source = tmp_path / "Condition.ndjson"
    long_line = '{"resourceType":"Condition","note":"' + "x" * 5000 + '"}'
    source.write_text(f"{long_line}\n{{}}\n", encoding="utf-8")
    folder = tmp_path / "pieces"
    folder.mkdir()
    (folder / "stale.piece").write_text("from an earlier run")

    _, pieces = cut_large_files([source], folder, piece_bytes=100)

    assert [p.path.read_text(encoding="utf-8") for p in pieces] == [long_line + "\n", "{}\n"]
    assert [p.first_line for p in pieces] == [1, 2]
    assert sorted(folder.iterdir()) == [p.path for p in pieces]  # the earlier run's piece is gone
