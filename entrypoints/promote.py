"""MLproject entry point `promote`: parse the parameters and call `smp promote` (see smp/cli.py)."""
import sys

from smp.cli import main

sys.exit(main(["promote", *sys.argv[1:]]))
