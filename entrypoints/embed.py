"""MLproject entry point `embed`: parse the parameters and call `smp embed` (see smp/cli.py)."""
import sys

from smp.cli import main

sys.exit(main(["embed", *sys.argv[1:]]))
