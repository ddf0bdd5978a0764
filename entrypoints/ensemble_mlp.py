"""MLproject entry point `ensemble_mlp`: parse the parameters and call `smp ensemble_mlp` (see smp/cli.py)."""
import sys

from smp.cli import main

sys.exit(main(["ensemble_mlp", *sys.argv[1:]]))
