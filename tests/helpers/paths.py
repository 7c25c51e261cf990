"""Where things are: the repository's root (the working directory of every subprocess)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
