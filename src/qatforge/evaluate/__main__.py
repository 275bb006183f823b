"""``python -m qatforge.evaluate``: evaluate one artifact (see ``qatforge.evaluate.main``)."""

import sys

from qatforge.evaluate import main

sys.exit(main())
