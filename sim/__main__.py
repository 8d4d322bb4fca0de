"""``python -m spendtap.sim --listen HOST:PORT``: run the simulated inference server."""

import sys

from .server import main

sys.exit(main())
