"""Endurance soak: `python scripts/soak.py [--cycles N ...]` (see tests/soak.py, where the loop lives
so that the soak test and this script share it without the tests importing scripts/)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.soak import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
