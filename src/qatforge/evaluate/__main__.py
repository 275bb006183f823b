"""``python -m qatforge.evaluate``: evaluate one artifact (see ``qatforge.evaluate.run.main``)."""

import sys

from qatforge.evaluate.run import main

sys.exit(main())
