"""``python -m qstar.eval``: the ``qstar-eval`` command line (:mod:`qstar.eval.command`)."""

import sys

from .command import cli

sys.exit(cli())
