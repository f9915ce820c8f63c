"""``python -m tests.soak``: the chaos soak (see tests/soak/runner.py)."""

import sys

from .runner import main

sys.exit(main())
