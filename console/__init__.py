"""gpusoc console: ingest the fleet, store it in DuckDB, detect, respond, and show it to operators."""

__version__ = "0.1.0"
