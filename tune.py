#!/usr/bin/env python
"""Tune the GDN-2 chunk kernels for this GPU and manage the config tables.

    python tune.py tune [--shapes 8x4096x16x128x128:bf16 ...] [--interpret] ...
    python tune.py show [profiles/h100-80gb-hbm3.json] [--json]
    python tune.py merge a.json b.json -o merged.json
    python tune.py export profiles/h100-80gb-hbm3.json dist/
    python tune.py measure [--profile TABLE] --output measured.json    # (GPU) re-time a table now
    python tune.py report [--profile TABLE] [--view suite|shape|convergence|coverage] ...

Errors are one line (``--debug`` for the traceback). Arguments only: everything runs in gdn2_tune.tuner.cli (and
gdn2_tune.reports.cli for ``report``).
"""

from __future__ import annotations

import sys

from gdn2_tune.tuner.cli import main

if __name__ == "__main__":
    sys.exit(main())
