"""Export a backbone for use without sslbench."""
