"""pytest configuration for the benchmarks (``pytest benchmarks --benchmark-only``).

The default ``pytest`` run collects only ``tests/`` (``testpaths`` in pyproject.toml), so these
cases run only when the ``benchmarks`` folder is named on the command line.

Environment:
    QSTAR_BENCH_DEVICE   device for the cases (default "cpu"; "cuda" on a GPU machine)
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The benchmark modules import each other by plain name (mask_attention, _common); the package is
# imported from the checkout when it is not installed.
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)
