"""MLproject entry point `benchmark`: parse the parameters and call `smp benchmark` (see smp/cli.py)."""
import sys

from smp.cli import main

sys.exit(main(["benchmark", *sys.argv[1:]]))
