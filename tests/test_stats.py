"""The engine-to-API-server stats file (server/stats.py)."""
from __future__ import annotations

import multiprocessing

import pytest

from vllm_vtprune.server import stats


@pytest.fixture
def stats_file(tmp_path, monkeypatch):
    path = tmp_path / "stats.bin"
    path.write_bytes(b"")
    monkeypatch.setenv(stats.ENV, str(path))
    return path


def _add_many(n: int) -> None:
    for _ in range(n):
        stats.add(1, 0.5, 0.25)


def test_figures_from_several_processes_add_up(stats_file):
    workers = [multiprocessing.get_context("fork").Process(target=_add_many, args=(200,))
               for _ in range(3)]
    for w in workers:
        w.start()
    _add_many(100)
    for w in workers:
        w.join()
    # every read-modify-write held the lock: no addition is lost
    assert stats.read() == {"images": 700.0, "encode_seconds": 350.0, "prune_seconds": 175.0}


def test_collector_names_and_no_file(stats_file, monkeypatch):
    stats.add(2, 1.5, 0.5)
    got = {m.name: m.samples[0].value for m in stats.StatsCollector().collect()}
    assert got == {"vtprune_images_encoded": 2.0, "vtprune_image_encode_seconds": 1.5,
                   "vtprune_pruning_seconds": 0.5}
    monkeypatch.delenv(stats.ENV)
    stats.add(1, 1.0, 1.0)  # no file: nothing recorded, nothing raised
    assert stats.read() == {"images": 0.0, "encode_seconds": 0.0, "prune_seconds": 0.0}


def test_ensure_path_creates_once(monkeypatch):
    monkeypatch.setenv(stats.ENV, "")  # restored afterwards: later servers keep their file
    monkeypatch.delenv(stats.ENV)
    path = stats.ensure_path()
    try:
        assert stats.ensure_path() == path
        stats.add(1, 2.0, 1.0)
        assert stats.read()["encode_seconds"] == 2.0
    finally:
        stats._remove(path)


def test_a_removed_file_is_created_again(stats_file):
    stats_file.unlink()
    stats.add(1, 0.5, 0.25)
    assert stats.read() == {"images": 1.0, "encode_seconds": 0.5, "prune_seconds": 0.25}
