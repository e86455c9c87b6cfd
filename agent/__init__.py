"""gpusoc agent: collect GPU and training telemetry on one host, buffer it, serve it, act on commands."""

__version__ = "0.1.0"
