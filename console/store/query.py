"""Ad-hoc read-only SQL over a store file, and printing the result as a table or JSON.

Backs `gpusoc-console query --db PATH "SQL" [--json]`. DuckDB lets only one process open a file
while it is being written, so querying the live file of a running collector fails; the error
raised here says so and points at the alternatives (the console's export, or stopping it).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb


class QueryError(RuntimeError):
    """A query could not run: missing file, locked file, or a SQL error; the message says which."""


class StoreLockedError(QueryError):
    """The database file is held open for writing by another process (or with other settings)."""


def is_lock_error(exc: BaseException) -> bool:
    """True when DuckDB refused to open a file because another process holds its lock."""
    text = str(exc).lower()
    return "could not set lock" in text or "conflicting lock" in text


def _is_config_conflict(exc: BaseException) -> bool:
    return "different configuration" in str(exc).lower()


def locked_message(db_path: str | Path, exc: BaseException) -> str:
    """Explain a lock failure in operator terms instead of DuckDB's."""
    return (
        f"cannot open {db_path}: it is in use by a running gpusoc collector/console "
        "(DuckDB allows one writing process per file). While it runs, `gpusoc-console query`, "
        "`export` and `alerts` on this file are answered by that process over its control socket "
        f"({db_path}.ctl); run a second collector or window on another --db, or stop the first. "
        f"DuckDB said: {exc}"
    )


def connect_read_only(db_path: str | Path) -> duckdb.DuckDBPyConnection:
    """Open a store file read-only, translating DuckDB's lock errors into StoreLockedError."""
    path = Path(db_path)
    if not path.exists():
        raise QueryError(f"no such database file: {path}")
    try:
        con = duckdb.connect(str(path), read_only=True)
    except (duckdb.IOException, duckdb.ConnectionException) as exc:
        if is_lock_error(exc) or _is_config_conflict(exc):
            raise StoreLockedError(locked_message(path, exc)) from exc
        raise
    con.execute("SET TimeZone = 'UTC'")
    return con


def run_query(
    db_path: str | Path, sql: str, read_only: bool = True
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one SQL statement and return (column names, rows), timestamps as aware UTC datetimes.

    Read-only by default so an operator's typo cannot modify evidence. Raises QueryError
    (StoreLockedError when a running collector holds the file) with an operator-readable message.
    """
    try:
        if read_only:
            con = connect_read_only(db_path)
        else:
            try:
                con = duckdb.connect(str(db_path))
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                if is_lock_error(exc) or _is_config_conflict(exc):
                    raise StoreLockedError(locked_message(db_path, exc)) from exc
                raise
            con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error as exc:
        raise QueryError(f"cannot open {db_path}: {exc}") from exc
    try:
        cur = con.execute(sql)
        if cur.description is None:
            return [], []
        columns = [str(d[0]) for d in cur.description]
        rows = [tuple(r) for r in cur.fetchall()]
        return columns, rows
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from exc
    finally:
        con.close()


def _iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)  # the store keeps UTC; naive results are UTC too
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def to_jsonable(value: Any) -> Any:
    """Convert a DuckDB result value to JSON: ISO-8601 UTC timestamps, null for NaN, hex for bytes."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dt.datetime):
        return _iso(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return str(value)


def _unique_names(columns: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out: list[str] = []
    for name in columns:
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}_{n + 1}")
    return out


def format_json(columns: Sequence[str], rows: Sequence[Sequence[Any]], lines: bool = True) -> str:
    """JSON for scripts and `jq`: one object per row, one row per line (JSON Lines) by default,
    or a single JSON array with lines=False. Duplicate column names get _2, _3...
    """
    names = _unique_names(columns)
    data = [{n: to_jsonable(v) for n, v in zip(names, row, strict=True)} for row in rows]
    if lines:
        return "\n".join(json.dumps(d, ensure_ascii=False) for d in data)
    return json.dumps(data, ensure_ascii=False)


def _cell(value: Any, max_width: int) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, dt.datetime):
        text = _iso(value)
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).hex()
    elif isinstance(value, dict | list):
        text = json.dumps(to_jsonable(value), ensure_ascii=False)
    else:
        text = str(value)
    text = text.replace("\n", "\\n")
    if len(text) > max_width:
        text = text[: max_width - 1] + "…"
    return text


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float | decimal.Decimal) and not isinstance(value, bool))


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 60) -> str:
    """An aligned plain-text table for a terminal; numbers right-aligned, NULL spelled out."""
    if not columns:
        return "(no result set)"
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    numeric = [bool(rows) and all(_is_number(r[i]) for r in rows) for i in range(len(columns))]

    def line(items: Sequence[str]) -> str:
        parts = [
            t.rjust(widths[i]) if numeric[i] else t.ljust(widths[i]) for i, t in enumerate(items)
        ]
        return " | ".join(parts).rstrip()

    out = [line(list(columns)), "-+-".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
