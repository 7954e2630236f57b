"""`python -m vlp.cli ...`: the same entry point as the `vlp` console script."""

import sys

from vlp.cli import main

sys.exit(main())
