"""MLproject entry point `tune`: parse the parameters and call `smp tune` (see smp/cli.py)."""
import sys

from smp.cli import main

sys.exit(main(["tune", *sys.argv[1:]]))
