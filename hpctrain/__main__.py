"""``python -m hpctrain ...`` (run under ``python -m mpi4py -m hpctrain`` with MPI)."""
import sys

from hpctrain.cli import main

sys.exit(main())
