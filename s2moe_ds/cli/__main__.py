"""``python -m s2moe_ds.cli``: the `s2moe` command."""

import sys

from . import main

sys.exit(main())
