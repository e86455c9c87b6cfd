"""PyInstaller entry point for the frozen `gpusoc-agent` (packaging/build_deb.sh).

freeze_support() first: `gpusoc-agent fleet-sim` starts worker processes with the spawn
method, which re-runs this executable; the call turns those runs into workers.
"""

import multiprocessing
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()
    from agent.cli import main

    sys.exit(main())
