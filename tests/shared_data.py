"""Where the real test images live: ``../shared/data`` beside the repository. Tests that
use them skip with a message when the folder is absent (a fresh machine has none)."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """The path of a shared data file or folder; skips the calling test if it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (see ../shared/data/README.md)")
    return path
