"""MLproject entry point `ensemble_conv1d`: parse the parameters and call `smp ensemble_conv1d` (see smp/cli.py)."""
import sys

from smp.cli import main

sys.exit(main(["ensemble_conv1d", *sys.argv[1:]]))
