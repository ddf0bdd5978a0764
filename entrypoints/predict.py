"""MLproject entry point `predict`: parse the parameters and call `smp predict` (see smp/cli.py)."""
import sys

from smp.cli import main

sys.exit(main(["predict", *sys.argv[1:]]))
