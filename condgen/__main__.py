"""`python -m condgen ...` runs the `condgen` command line, e.g. under a launcher that needs a
module or a script path: `torchrun --nproc_per_node 2 -m condgen train ...`."""

import sys

from condgen.cli import main

if __name__ == "__main__":
    sys.exit(main())
