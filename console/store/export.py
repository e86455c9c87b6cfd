"""Audit export: a standalone DuckDB file with every store table plus provenance rows in `meta`.

Two entry points, because DuckDB lets only one process open a file for writing:
`StoreWriter.export()` runs `export_from_connection` on the writer thread between flushes (the
console is running), and `export_db()` opens the source read-only when no process writes it.
The copy uses ATTACH + COPY FROM DATABASE, so it keeps the schema (keys, types) and needs no
extension; it is written to a temporary sibling and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from pathlib import Path
from typing import Any

import duckdb

from console.store.query import StoreLockedError, locked_message
from console.store.schema import SCHEMA_VERSION, TABLES, check_schema_version

# Tables whose time column bounds the export's time range, and that column.
TIME_COLUMNS: dict[str, str] = {
    "gpu_samples": "ts",
    "train_samples": "ts",
    "events": "ts",
    "gpu_samples_1m": "bucket",
}

_ALIAS = "gpusoc_export_out"

# On-disk format of exports: readable by any DuckDB (CLI or library) from 1.0 on, not only the
# version the console runs. None = this DuckDB's default (may need the newest reader).
EXPORT_STORAGE_VERSION = "v1.0.0"


def quote_ident(name: str) -> str:
    """Quote a SQL identifier (database names come from file names and may contain anything)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """Quote a SQL string literal (ATTACH takes no bound parameters)."""
    return "'" + text.replace("'", "''") + "'"


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return str(value)


def _remove_quietly(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _summarise(
    con: duckdb.DuckDBPyConnection, alias: str
) -> tuple[dict[str, int], dict[str, tuple[dt.datetime | None, dt.datetime | None]]]:
    rows: dict[str, int] = {}
    ranges: dict[str, tuple[dt.datetime | None, dt.datetime | None]] = {}
    for table in TABLES:
        if table == "meta":
            continue
        got = con.execute(f"SELECT count(*) FROM {alias}.{table}").fetchone()
        rows[table] = int(got[0]) if got else 0
    for table, column in TIME_COLUMNS.items():
        got = con.execute(f"SELECT min({column}), max({column}) FROM {alias}.{table}").fetchone()
        ranges[table] = (got[0], got[1]) if got else (None, None)
    return rows, ranges


def export_from_connection(
    con: duckdb.DuckDBPyConnection,
    out_path: str | Path,
    *,
    source_path: str,
    method: str,
    source_db: str | None = None,
    storage_version: str | None = EXPORT_STORAGE_VERSION,
    schema_version: int = SCHEMA_VERSION,
) -> dict[str, Any]:
    """Copy every table of `source_db` (default: the connection's database) into a new file.

    `schema_version` is the source's (an offline export of an older file keeps its version, so
    readers know which columns it has).

    Runs in one transaction on the caller's connection, so the copy is a consistent snapshot.
    Returns a summary (path, rows per table, time range, exported_at) that is also in `meta`.
    """
    out = Path(out_path).resolve()
    if out.exists():
        raise FileExistsError(f"export target already exists: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove_quietly(tmp)
    if source_db is None:
        got = con.execute("SELECT current_database()").fetchone()
        source_db = str(got[0]) if got else "main"
    exported_at = _iso(dt.datetime.now(dt.UTC))
    options = f" (STORAGE_VERSION {quote_literal(storage_version)})" if storage_version else ""
    con.execute(f"ATTACH {quote_literal(str(tmp))} AS {_ALIAS}{options}")
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f"COPY FROM DATABASE {quote_ident(source_db)} TO {_ALIAS}")
            rows, raw_ranges = _summarise(con, _ALIAS)
            mins = [r[0] for r in raw_ranges.values() if r[0] is not None]
            maxs = [r[1] for r in raw_ranges.values() if r[1] is not None]
            ranges = {t: [_iso(lo), _iso(hi)] for t, (lo, hi) in raw_ranges.items()}
            meta: dict[str, str | None] = {
                "schema_version": str(schema_version),
                "exported_at": exported_at,
                "export_source_path": source_path,
                "export_method": method,
                "export_storage_version": storage_version or "default",
                "time_range_min": _iso(min(mins)) if mins else None,
                "time_range_max": _iso(max(maxs)) if maxs else None,
            }
            for table, (lo_s, hi_s) in ranges.items():
                meta[f"time_range.{table}.min"] = lo_s
                meta[f"time_range.{table}.max"] = hi_s
            for table, n in rows.items():
                meta[f"rows.{table}"] = str(n)
            _insert_meta(con, meta)
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute(f"DETACH {_ALIAS}")
        _remove_quietly(tmp)
        raise
    con.execute(f"DETACH {_ALIAS}")
    os.replace(tmp, out)
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "schema_version": schema_version,
        "exported_at": exported_at,
        "source_path": source_path,
        "method": method,
        "time_range": ranges,
        "time_range_min": meta["time_range_min"],
        "time_range_max": meta["time_range_max"],
        "rows": rows,
    }


def _insert_meta(con: duckdb.DuckDBPyConnection, meta: dict[str, str | None]) -> None:
    # One statement with a VALUES list: a handful of rows, not a row-at-a-time loop.
    placeholders = ", ".join("(?, ?)" for _ in meta)
    params: list[str | None] = []
    for key, value in meta.items():
        params.extend((key, value))
    con.execute(f"INSERT OR REPLACE INTO {_ALIAS}.meta VALUES {placeholders}", params)


def export_db(
    src_db_path: str | Path, out_path: str | Path, storage_version: str | None = EXPORT_STORAGE_VERSION
) -> dict[str, Any]:
    """Export a store file that no process is writing (collector stopped); opens it read-only.

    While a collector runs, use `StoreWriter.export()` in that process instead: DuckDB refuses a
    second process, and this raises StoreLockedError saying so.
    """
    src = Path(src_db_path).resolve()
    if not src.exists():
        raise FileNotFoundError(f"no such database file: {src}")
    con = duckdb.connect()
    try:
        try:
            con.execute(f"ATTACH {quote_literal(str(src))} AS gpusoc_export_src (READ_ONLY)")
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            text = str(exc).lower()
            if "lock" in text or "different configuration" in text:
                raise StoreLockedError(locked_message(src, exc)) from exc
            raise
        con.execute("USE gpusoc_export_src")
        version = check_schema_version(con)
        if version is None:
            raise ValueError(f"{src} is not a gpusoc store (no meta.schema_version)")
        return export_from_connection(
            con, out_path, source_path=str(src), method="offline", source_db="gpusoc_export_src",
            storage_version=storage_version, schema_version=version,
        )
    finally:
        con.close()
