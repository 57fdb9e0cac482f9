"""`learned-router`: one module of commands per subject; each only parses options, calls the package and prints."""

from . import router, evals, serve, records, label, tools  # noqa: F401  (they register their commands, in this order)
from .main import app

__all__ = ["app"]
