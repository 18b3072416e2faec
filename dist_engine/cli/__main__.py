"""``python -m dist_engine.cli``."""

import sys

from dist_engine.cli import main

sys.exit(main())
