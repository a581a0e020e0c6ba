"""Where the default data lives: ../shared/data beside the repository, used only when that folder exists."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_dir() -> Path | None:
    """$LILLM_DATA_DIR if set, else ../shared/data next to the repo if it exists, else None."""
    if os.environ.get("LILLM_DATA_DIR"):
        return Path(os.environ["LILLM_DATA_DIR"])
    candidate = REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def default_data_file(name: str) -> Path:
    """A file of the default data folder, or a clear error saying how to pass a path instead."""
    data_dir = default_data_dir()
    if data_dir is None:
        raise FileNotFoundError(f"no input given and no default data folder ({REPO_ROOT.parent / 'shared' / 'data'}); pass a path")
    path = data_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"default data file not found: {path}; pass a path")
    return path
