"""``python -m gdn2_tune.reports``: the same as ``python tune.py report``."""

from __future__ import annotations

import sys

from gdn2_tune.reports.cli import main

sys.exit(main())
