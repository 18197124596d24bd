"""`accelerate launch [--multi_gpu --num_processes N] -m data_prep RECIPE [overrides]`: prep on N ranks."""

import sys

from wan_tune.cli import main

sys.exit(main(["prep", *sys.argv[1:]]))
