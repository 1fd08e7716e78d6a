"""The epoch file: a record that round-trips, replaced whole, and ``None`` for anything it did not write."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.disk.epoch_file import read_epoch_file, write_epoch_file


def test_epochs_round_trip_and_a_write_replaces_the_record(tmp_path: Path) -> None:
    path = str(tmp_path / "epochs.json")
    assert read_epoch_file(path) is None
    write_epoch_file(path, {"model": 1, "tenant/a": 7})
    assert read_epoch_file(path) == {"model": 1, "tenant/a": 7}
    write_epoch_file(path, {"model": 2})
    assert read_epoch_file(path) == {"model": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["epochs.json"]  # no temporary file left behind


@pytest.mark.parametrize("content", [
    "", "{", "[]", '{"version": 2, "epochs": {}}', '{"version": 1}', '{"version": 1, "epochs": []}',
    '{"version": 1, "epochs": {"model": -1}}', '{"version": 1, "epochs": {"model": 1.0}}',
    '{"version": 1, "epochs": {"model": true}}', '{"version": 1, "epochs": {"model": "1"}}',
])
def test_a_record_this_module_did_not_write_reads_as_none(tmp_path: Path, content: str) -> None:
    path = tmp_path / "epochs.json"
    path.write_text(content)
    assert read_epoch_file(str(path)) is None


def test_a_directory_in_place_of_the_file_reads_as_none(tmp_path: Path) -> None:
    (tmp_path / "epochs.json").mkdir()
    assert read_epoch_file(str(tmp_path / "epochs.json")) is None
