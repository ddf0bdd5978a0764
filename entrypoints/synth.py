"""MLproject entry point `synth`: parse the parameters and call `smp synth` (see smp/cli.py)."""
import sys

from smp.cli import main

sys.exit(main(["synth", *sys.argv[1:]]))
