"""One module per CLI verb that is more than a call into ``training``: ``check``, ``dry_run``, ``eval``,
``list``. ``sslbench.cli`` parses the command line and dispatches here. The top layer: nothing imports it.
"""
