"""One module per ``icsmon`` subcommand, each with ``register(subparsers)``."""
