"""DuckDB storage of the console: schema, the single writer thread, audit export, ad-hoc queries."""

from console.store.export import export_db
from console.store.query import QueryError, StoreLockedError, format_json, format_table, run_query
from console.store.schema import SCHEMA_VERSION, SchemaVersionError, ensure_schema
from console.store.writer import StoreWriter

__all__ = [
    "SCHEMA_VERSION",
    "QueryError",
    "SchemaVersionError",
    "StoreLockedError",
    "StoreWriter",
    "ensure_schema",
    "export_db",
    "format_json",
    "format_table",
    "run_query",
]
