"""Response actions on this host: verify signed commands, freeze/resume jobs, signed-checkpoint rollback.

Importing the package costs nothing: `agent.act.checkpoints` (what the training SDK calls
after a save) needs only the standard library and `cryptography`; the command path
(`agent.act.controller`) is imported by the agent alone. docs/response.md.
"""
