"""``python -m sim`` is ``python -m sim.provider``: run the simulated LLM provider."""

import sys

from sim.provider import main

sys.exit(main(sys.argv[1:]))
