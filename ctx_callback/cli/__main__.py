"""``python -m ctx_callback.cli ARGS``: the ``ctx-callback`` command line."""

import sys

from . import main

sys.exit(main())
