"""The `pykata` command line."""
