"""``python -m matfn``: the same as the ``matfn`` script (see :mod:`matfn.cli`)."""

import sys

from .cli import main

sys.exit(main())
