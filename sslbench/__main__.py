"""``python -m sslbench`` (and ``accelerate launch -m sslbench run ...``)."""

import sys

from sslbench.cli import main

sys.exit(main())
