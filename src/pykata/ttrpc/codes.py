"""google.rpc status codes; defined in pykata.errors (domain errors carry them) and re-exported here."""

from pykata.errors import Code

__all__ = ["Code"]
