"""learned-router: route each LLM request to the cheap model when its answer will pass the bar.

Importing this package (and scoring with it) never imports torch.
"""

from .errors import DataError, RouterError, RouterFolderError
from .outputs import Outputs
from .scorer import Decision, Router, choose_tier

__version__ = "0.1.0"
__all__ = [
    "Router",
    "Outputs",
    "Decision",
    "choose_tier",
    "RouterError",
    "DataError",
    "RouterFolderError",
    "__version__",
]
