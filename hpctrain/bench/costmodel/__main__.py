"""``python -m hpctrain.bench.costmodel``: the same as ``python -m hpctrain.bench costmodel``."""
import sys

from hpctrain.bench.costmodel.report import main

sys.exit(main())
