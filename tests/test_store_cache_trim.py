"""The store's block cache is trimmed after maintenance, so a long-running console's RSS stays flat."""

from __future__ import annotations

from pathlib import Path

import pytest

from console.store.writer import StoreWriter


def _cached_table_mb(writer: StoreWriter) -> float:
    rows = writer.read_query(
        "SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory() WHERE tag = 'BASE_TABLE'"
    )
    return float(rows[0][0]) / 2**20


def _fill(writer: StoreWriter) -> None:
    # ~25 MB of incompressible doubles, written and checkpointed: all of it stays cached.
    writer.run_on_writer(
        lambda c: c.execute("CREATE TABLE scratch AS SELECT range AS i, random() AS x FROM range(3000000)")
    )


@pytest.mark.parametrize(("cache_limit", "trimmed"), [("8MB", True), (None, False)])
def test_maintenance_trims_block_cache(tmp_path: Path, cache_limit: str | None, trimmed: bool) -> None:
    w = StoreWriter(tmp_path / "s.duckdb", memory_limit="256MB", cache_limit=cache_limit)
    w.start()
    try:
        _fill(w)
        result = w.run_maintenance()
        cached = _cached_table_mb(w)
        limit = w.read_query("SELECT current_setting('memory_limit')")[0][0]
    finally:
        w.stop()
    assert result["cache_trimmed"] is trimmed
    if trimmed:
        assert cached <= 8.5, cached
    else:
        assert cached > 16, cached  # the control: without a trim the cache keeps what was written
    assert "244" in str(limit) or "256" in str(limit), limit  # headroom for queries restored (256 MB)


def test_sizes_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cache_limit"):
        StoreWriter(tmp_path / "s.duckdb", cache_limit="32MB'; DROP TABLE frames; --")


def test_maintenance_releases_free_heap(tmp_path: Path) -> None:
    import sys

    w = StoreWriter(tmp_path / "s.duckdb")
    w.start()
    try:
        result = w.run_maintenance()
    finally:
        w.stop()
    assert result["heap_released"] is sys.platform.startswith("linux")  # glibc here; False elsewhere


def test_trim_waits_for_no_reader(tmp_path: Path) -> None:
    """memory_limit is database-wide: no trim while a read runs (its query could fail OutOfMemory)."""
    w = StoreWriter(tmp_path / "s.duckdb", memory_limit="256MB", cache_limit="4MB")
    w.start()
    try:
        _fill(w)
        with w.reading():  # e.g. a UI history query or a control-socket query in progress
            during = w.run_maintenance()["cache_trimmed"]
        after = w.run_maintenance()["cache_trimmed"]
        stats = w.stats
        limit = w.read_query("SELECT current_setting('memory_limit')")[0][0]
    finally:
        w.stop()
    assert (during, after) == (False, True)
    assert stats["cache_trims_skipped"] == 1 and stats["cache_trims"] == 1
    assert "244" in str(limit) or "256" in str(limit), limit


def test_a_skipped_trim_is_retried_soon_not_at_the_next_maintenance(tmp_path: Path) -> None:
    """A soak beside a CI run had reads covering every maintenance for 9 minutes: the cache grew
    ~10 MB until a trim got through. A skipped trim is now retried after `trim_retry_s`."""
    import time

    w = StoreWriter(tmp_path / "s.duckdb", memory_limit="256MB", cache_limit="4MB", trim_retry_s=0.2,
                    rollup_interval_s=3600)
    w.start()
    try:
        _fill(w)
        with w.reading():
            assert w.run_maintenance()["cache_trimmed"] is False
            time.sleep(0.5)  # retries while the read runs are skipped too
        deadline = time.monotonic() + 20
        while w.stats["cache_trims"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = w.stats
        cached = _cached_table_mb(w)
    finally:
        w.stop()
    assert stats["cache_trims"] == 1 and stats["cache_trims_skipped"] >= 2
    assert cached <= 4.5, cached
