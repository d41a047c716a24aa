"""``python -m vd_core``: see :mod:`vd_core.cli`."""

import sys

from .cli import main

sys.exit(main())
