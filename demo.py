"""Run the agentcomms demo: ``python demo.py`` does what ``agentcomms demo`` does."""

import sys

from agentcomms.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "demo", *sys.argv[1:]]
    main()
