import sys

from qatforge.capabilities.install import main

sys.exit(main())
