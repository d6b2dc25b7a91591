"""``python -m s2moe_ds.train`` (and ``deepspeed --module s2moe_ds.train``): the ``s2moe train`` command."""

import sys

from ..cli.train import main

sys.exit(main())
