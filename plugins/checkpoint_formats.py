"""Built-in checkpoint formats: timm, official MAE, data2vec 2.0 (fairseq key names) and sslbench's own."""

from __future__ import annotations

import sslbench
from sslbench.core.checkpoints import BUILTIN_FORMATS


@sslbench.hookimpl
def register_checkpoint_formats(register):
    for name, fmt in BUILTIN_FORMATS.items():
        register(name, fmt)
