"""The `aim-serve` command line, above the service and the engine, one module per audience (cli/main.py)."""
