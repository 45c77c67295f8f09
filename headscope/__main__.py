"""`python -m headscope ...`: the command line (headscope/cli.py)."""
import sys

from headscope.cli import main

sys.exit(main())
