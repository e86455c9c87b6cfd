"""Subscribers: one asyncio gRPC client per agent, feeding the store writer and any live sinks."""
