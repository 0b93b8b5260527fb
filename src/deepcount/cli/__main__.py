"""``python -m deepcount.cli ...``: the same as ``deepcount ...``."""

import sys

from . import main

sys.exit(main())
