"""``python -m cir_plugins.cli COMMAND ...``: the same as the ``cir-plugins`` console script."""

import sys

from . import main

sys.exit(main())
