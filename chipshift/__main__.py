"""`python -m chipshift ...` (what `torchrun -m chipshift` runs)."""

import sys

from chipshift.cli import main

sys.exit(main())
