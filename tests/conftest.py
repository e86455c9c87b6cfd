"""Shared fixtures: headless Qt, and helpers to build frames."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
