"""``python -m sslbench`` (and ``accelerate launch -m sslbench run ...``)."""

import sys

from .cli import main

sys.exit(main())
