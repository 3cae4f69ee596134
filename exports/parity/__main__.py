"""``python -m exports.parity``: see :mod:`exports.parity.cli`."""

import sys

from exports.parity.cli import main

sys.exit(main())
