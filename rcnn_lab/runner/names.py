"""Names on disk derived from a run: folder-safe text and a run's output folder name (``runner.plan`` plans
with them; ``runner.weights`` finds a finished run's folder again from its tags)."""

from __future__ import annotations

import re


def file_part(text: str) -> str:
    """``text`` as part of a file or folder name: every run of other characters than ``A-Za-z0-9_.=-`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def slug(variant: str, seed: int | str, config_hash: str) -> str:
    """A run's output folder name from its variant, seed and config hash (also read back from a run's tags)."""
    return file_part(f"{variant}-s{seed}")[:80] + f"-{config_hash[:8]}"
