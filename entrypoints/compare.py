"""MLproject entry point `compare`: parse the parameters and call `smp compare` (see smp/cli.py)."""
import sys

from smp.cli import main

sys.exit(main(["compare", *sys.argv[1:]]))
