"""The ``qvd-bench`` command line: one module per subcommand (``add_parser`` and
``run``), the entry point in ``main``."""
