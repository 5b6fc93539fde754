"""classify's SOURCEs: one suffix rule with the stream worker and backfill, and errors that say what is wrong."""

import pytest

from inference.errors import SourceError
from inference.settings import FilterSettings, StorageSettings
from inference.client.sources import iter_sources

SUFFIXES = FilterSettings().suffixes


def test_a_folder_yields_its_images_by_name_in_any_case_and_a_named_file_is_always_taken(tmp_path):
    for name in ("a.jpg", "b.JPG", "c.webp", "notes.txt", ".hidden.jpg"):
        (tmp_path / name).write_bytes(b"x")
    found = [uri.rsplit("/", 1)[1] for uri in iter_sources([str(tmp_path)], StorageSettings(), SUFFIXES)]
    assert found == ["a.jpg", "b.JPG", "c.webp"]
    assert [uri.rsplit("/", 1)[1] for uri in iter_sources([str(tmp_path / "notes.txt")], StorageSettings(), SUFFIXES)] == ["notes.txt"]
    assert len(list(iter_sources([str(tmp_path)], StorageSettings()))) == 4  # no suffixes: everything


def test_a_source_with_nothing_to_classify_says_why(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="an empty folder"):
        list(iter_sources([str(tmp_path / "empty")], StorageSettings(), SUFFIXES))
    with pytest.raises(SourceError, match="none of its 1 files is an image by name"):
        list(iter_sources([str(tmp_path / "texts")], StorageSettings(), SUFFIXES))
    with pytest.raises(SourceError, match="no such file, folder, or objects"):
        list(iter_sources([str(tmp_path / "missing")], StorageSettings(), SUFFIXES))
