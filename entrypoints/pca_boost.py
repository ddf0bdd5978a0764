"""MLproject entry point `pca_boost`: parse the parameters and call `smp pca_boost` (see smp/cli.py)."""
import sys

from smp.cli import main

sys.exit(main(["pca_boost", *sys.argv[1:]]))
