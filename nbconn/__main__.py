"""``python -m nbconn``: see :mod:`nbconn.cli`."""

import sys

from .cli import main

sys.exit(main())
