"""``python -m qatforge.train``: see ``qatforge.train.cli``."""

import sys

from qatforge.train.cli import main

sys.exit(main())
