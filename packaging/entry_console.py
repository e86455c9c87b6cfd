"""PyInstaller entry point for the frozen `gpusoc-console` (packaging/build_desktop.sh).

`--demo` starts the simulated fleet as `sys.executable -m agent.cli fleet-sim ...`. Frozen,
sys.executable is this program, so `-m agent.cli ARGS` is routed to the agent's CLI here, and
freeze_support() turns the fleet's spawn-method worker processes (which re-run this
executable) into workers.
"""

import multiprocessing
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()
    if sys.argv[1:3] == ["-m", "agent.cli"]:
        from agent.cli import main as agent_main

        sys.exit(agent_main(sys.argv[3:]))
    from console.cli import main

    sys.exit(main())
