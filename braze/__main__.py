"""`python -m braze` (and `torchrun -m braze`): the `braze` command."""

import sys

from braze.cli import main

sys.exit(main())
