"""``python -m nbconn``: see :mod:`nbconn.cli`."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI is still importing: one line, no traceback
    sys.stderr.write("nbconn: interrupted\n")
    sys.exit(130)

sys.exit(main())
