"""`python -m soda_distill`, as `accelerate launch -m soda_distill` and `torchrun -m soda_distill` start it."""

import sys

from .cli import main

sys.exit(main())
