"""DuckDB schema of the console store: table DDL, the schema version, and the open-time check.

Column meanings are documented in docs/schema.md; keep the two in step. Only plain DuckDB types
are used (JSON is stored as VARCHAR text) so an exported file opens in a stock DuckDB CLI.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

from protos.types import GPU_STATE_NAMES, METRIC_NAMES, METRIC_SCHEMA

SCHEMA_VERSION: Final = 2
# Version history (docs/schema.md):
#   1: first release.
#   2: alerts.simulated (whether the data behind an alert came from simulated GPUs).

# Every table the store owns, in creation order (exports copy all of them).
TABLES: Final[tuple[str, ...]] = (
    "meta",
    "hosts",
    "gpus",
    "frames",
    "frames_compacted",
    "gpu_samples",
    "gpu_samples_1m",
    "train_samples",
    "events",
    "gaps",
    "alerts",
    "audit_log",
)

ROLLUP_SUFFIXES: Final[tuple[str, ...]] = ("min", "mean", "max")
ALERT_STATES: Final[tuple[str, ...]] = ("open", "acknowledged", "resolved")


class SchemaVersionError(RuntimeError):
    """The database was written by a newer (or unknown) schema than this code understands."""


def _metric_columns() -> str:
    return ",\n    ".join(f"{name} REAL" for name in METRIC_NAMES)


def _rollup_columns() -> str:
    return ",\n    ".join(f"{name}_{s} REAL" for name in METRIC_NAMES for s in ROLLUP_SUFFIXES)


def _alert_state_check() -> str:
    return ", ".join(f"'{s}'" for s in ALERT_STATES)


DDL: Final[dict[str, str]] = {
    "meta": """
CREATE TABLE IF NOT EXISTS meta (
    key VARCHAR PRIMARY KEY,
    value VARCHAR
)""",
    "hosts": """
CREATE TABLE IF NOT EXISTS hosts (
    host VARCHAR PRIMARY KEY,
    agent_version VARCHAR,
    first_seen TIMESTAMPTZ,
    last_seen TIMESTAMPTZ,
    simulated BOOLEAN,
    epoch VARCHAR,
    address VARCHAR,
    n_gpus INTEGER,
    nvml_status VARCHAR
)""",
    "gpus": """
CREATE TABLE IF NOT EXISTS gpus (
    host VARCHAR NOT NULL,
    gpu_index SMALLINT NOT NULL,
    uuid VARCHAR,
    name VARCHAR,
    memory_total_mib REAL,
    driver_version VARCHAR,
    pci_bus_id VARCHAR,
    simulated BOOLEAN,
    PRIMARY KEY (host, gpu_index)
)""",
    "frames": """
CREATE TABLE IF NOT EXISTS frames (
    host VARCHAR NOT NULL,
    epoch VARCHAR NOT NULL,
    seq BIGINT NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    committed_at TIMESTAMPTZ NOT NULL,
    n_gpus SMALLINT NOT NULL,
    simulated BOOLEAN NOT NULL,
    PRIMARY KEY (host, epoch, seq)
)""",
    "frames_compacted": """
CREATE TABLE IF NOT EXISTS frames_compacted (
    host VARCHAR NOT NULL,
    epoch VARCHAR NOT NULL,
    max_seq BIGINT NOT NULL,
    max_ts TIMESTAMPTZ NOT NULL,
    n_frames BIGINT NOT NULL,
    compacted_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (host, epoch)
)""",
    "gpu_samples": f"""
CREATE TABLE IF NOT EXISTS gpu_samples (
    host VARCHAR NOT NULL,
    epoch VARCHAR NOT NULL,
    seq BIGINT NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    gpu_index SMALLINT NOT NULL,
    gpu_state VARCHAR NOT NULL,
    simulated BOOLEAN NOT NULL,
    {_metric_columns()}
)""",
    "gpu_samples_1m": f"""
CREATE TABLE IF NOT EXISTS gpu_samples_1m (
    host VARCHAR NOT NULL,
    gpu_index SMALLINT NOT NULL,
    bucket TIMESTAMPTZ NOT NULL,
    simulated BOOLEAN NOT NULL,
    n BIGINT NOT NULL,
    {_rollup_columns()},
    PRIMARY KEY (host, gpu_index, bucket)
)""",
    "train_samples": """
CREATE TABLE IF NOT EXISTS train_samples (
    host VARCHAR NOT NULL,
    epoch VARCHAR NOT NULL,
    seq BIGINT NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    job_id VARCHAR,
    rank INTEGER,
    local_rank INTEGER,
    world_size INTEGER,
    pid BIGINT,
    uid BIGINT,
    step BIGINT,
    kind VARCHAR,
    loss DOUBLE,
    grad_norm DOUBLE,
    lr DOUBLE,
    tokens DOUBLE,
    extra MAP(VARCHAR, DOUBLE),
    info VARCHAR,
    simulated BOOLEAN NOT NULL
)""",
    "events": """
CREATE TABLE IF NOT EXISTS events (
    host VARCHAR NOT NULL,
    epoch VARCHAR NOT NULL,
    seq BIGINT NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    kind VARCHAR NOT NULL,
    severity VARCHAR NOT NULL,
    gpu_index SMALLINT,
    pid BIGINT,
    detail VARCHAR,
    attrs VARCHAR,
    simulated BOOLEAN NOT NULL
)""",
    "gaps": """
CREATE TABLE IF NOT EXISTS gaps (
    host VARCHAR NOT NULL,
    epoch VARCHAR NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    reason VARCHAR,
    detected_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (host, epoch, first_seq, last_seq)
)""",
    "alerts": f"""
CREATE TABLE IF NOT EXISTS alerts (
    alert_id VARCHAR PRIMARY KEY,
    kind VARCHAR NOT NULL,
    severity VARCHAR NOT NULL,
    state VARCHAR NOT NULL CHECK (state IN ({_alert_state_check()})),
    host VARCHAR,
    gpu_index SMALLINT,
    job_id VARCHAR,
    rank INTEGER,
    onset_ts TIMESTAMPTZ,
    detected_ts TIMESTAMPTZ NOT NULL,
    evidence VARCHAR,
    dedup_key VARCHAR NOT NULL UNIQUE,
    updated_at TIMESTAMPTZ NOT NULL,
    simulated BOOLEAN
)""",
    "audit_log": """
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY,
    ts TIMESTAMPTZ NOT NULL,
    actor VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    target VARCHAR,
    payload VARCHAR,
    prev_hash BLOB,
    hash BLOB NOT NULL
)""",
}

# gpu_samples.gpu_state values: the names from protos.types.GPU_STATE_NAMES.
GPU_STATE_VALUES: Final[tuple[str, ...]] = tuple(GPU_STATE_NAMES[k] for k in sorted(GPU_STATE_NAMES))


def _table_exists(con: Any, name: str) -> bool:
    row = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = 'main' AND table_name = ?",
        [name],
    ).fetchone()
    return bool(row and row[0])


def read_schema_version(con: Any) -> int | None:
    """The schema version stored in `meta`, or None for a database the store never initialised."""
    if not _table_exists(con, "meta"):
        return None
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        return None
    try:
        return int(row[0])
    except (TypeError, ValueError) as exc:
        raise SchemaVersionError(f"meta.schema_version is not an integer: {row[0]!r}") from exc


def check_schema_version(con: Any) -> int | None:
    """Refuse a database newer than this code, so an old console never writes rows it misreads."""
    version = read_schema_version(con)
    if version is not None and version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"database schema version {version} is newer than this gpusoc build supports "
            f"({SCHEMA_VERSION}); upgrade gpusoc or open the file with the version that wrote it"
        )
    if version is not None and version < 1:
        raise SchemaVersionError(f"database schema version {version} is not a gpusoc schema")
    return version


def _migrate(con: Any, version: int | None) -> None:
    """Bring a store written by an older schema up to SCHEMA_VERSION, inside ensure_schema's txn.

    `version` None: a file with tables but no version stamp (made by hand or by an old tool);
    the same steps apply, each idempotent. Old rows are labelled from what the file itself knows,
    never guessed: an alert is simulated when the `hosts` row of its host says so, and stays NULL
    (unknown) otherwise.
    """
    if version is None or version < 2:
        con.execute("ALTER TABLE alerts ADD COLUMN IF NOT EXISTS simulated BOOLEAN")
        con.execute(
            "UPDATE alerts SET simulated = h.simulated FROM hosts h "
            "WHERE alerts.host = h.host AND alerts.simulated IS NULL"
        )
    if version is None:
        return  # stamped below like a new store
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
    con.execute(
        "INSERT OR REPLACE INTO meta VALUES (?, ?)",
        [f"migrated_from_{version}", dt.datetime.now(dt.UTC).isoformat()],
    )


def ensure_schema(con: Any) -> int:
    """Create missing tables and stamp the version; raise SchemaVersionError on a newer database.

    Idempotent, so every open can call it. Returns the schema version now in the file.
    """
    version = check_schema_version(con)
    now = dt.datetime.now(dt.UTC).isoformat()
    con.execute("BEGIN TRANSACTION")
    try:
        for name in TABLES:
            con.execute(DDL[name])
        if version is None or version < SCHEMA_VERSION:
            _migrate(con, version)
        con.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?), ('created_at', ?), "
            "('metric_schema', ?), ('metric_names', ?)",
            [str(SCHEMA_VERSION), now, str(METRIC_SCHEMA), ",".join(METRIC_NAMES)],
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION
