"""`python -m hps_jax.cli ...` is `hps-jax ...`."""

import sys

from hps_jax.cli import main

sys.exit(main())
