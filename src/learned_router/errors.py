"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class RouterError(Exception):
    """Something the user can fix: a bad file, field or value. The message names it."""


class DataError(RouterError):
    """Training or evaluation data is missing, malformed or does not fit the request."""


class RouterFolderError(RouterError):
    """A router folder is missing a file, or a file does not match its manifest."""


def first_error(e) -> tuple[tuple, str]:
    """A pydantic ValidationError as one line's parts: its first error's location and message ("required" for a
    missing key, without pydantic's "Value error, " prefix). Each caller spells the location its own way."""
    err = e.errors()[0]
    return err["loc"], "required" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
