"""`python -m device_sim ...`: see device_sim.cli."""

import sys

from .cli import main

sys.exit(main())
