"""``python -m qstar.star``: the STaR loop (:mod:`qstar.star.command`)."""

import sys

from .command import cli

sys.exit(cli())
