"""``python -m reports``: the same as ``python tune.py report``."""

from __future__ import annotations

import sys

from reports.cli import main

sys.exit(main())
