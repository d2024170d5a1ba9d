"""Built-in checkpoint formats: timm, official MAE, data2vec 2.0 (fairseq key names), MoCo v3 and sslbench's own."""

from __future__ import annotations

import sslbench
from sslbench.core.checkpoints import BUILTIN_FORMATS
from sslbench.core.mocov3_format import MOCOV3_FORMATS


@sslbench.hookimpl
def register_checkpoint_formats(register):
    for name, fmt in {**BUILTIN_FORMATS, **MOCOV3_FORMATS}.items():
        register(name, fmt)
