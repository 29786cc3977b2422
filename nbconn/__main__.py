"""``python -m nbconn``: see :mod:`nbconn.cli`."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI is still importing: one line, no traceback
    sys.stderr.write("nbconn: interrupted\n")
    sys.exit(130)
except RuntimeError as exc:  # the same Ctrl-C, wrapped by Python 3.10 when it lands in a class's __set_name__
    if not isinstance(exc.__cause__, KeyboardInterrupt):
        raise
    sys.stderr.write("nbconn: interrupted\n")
    sys.exit(130)

sys.exit(main())
