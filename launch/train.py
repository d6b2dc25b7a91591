"""Training entry as a script path, for launchers that start ``python <file>`` instead of
``python -m <module>`` (``deepspeed --launcher slurm``). Same arguments as ``python -m s2moe_ds.train``."""

import sys

from s2moe_ds.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
