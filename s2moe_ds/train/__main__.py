"""``python -m s2moe_ds.train`` (and ``deepspeed --module s2moe_ds.train``)."""

import sys

from . import main

sys.exit(main())
