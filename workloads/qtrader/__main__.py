"""``python -m qtrader``: the same as the ``qtrader`` command."""

import sys

from qtrader.cli import main

sys.exit(main())
