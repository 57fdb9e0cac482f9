"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class RouterError(Exception):
    """Something the user can fix: a bad file, field or value. The message names it."""


class DataError(RouterError):
    """Training or evaluation data is missing, malformed or does not fit the request."""


class RouterFolderError(RouterError):
    """A router folder is missing a file, or a file does not match its manifest."""
