"""`python -m device_sim.fleet`: the fleet simulator's own entry point.

Worker processes are spawned and unpickle their jobs and results by module name
(device_sim.fleet.worker), never from `__main__`, so this module only calls the CLI;
the guard keeps a spawned child, which imports it as `__mp_main__`, from running it.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
