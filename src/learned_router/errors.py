"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""

import os


class RouterError(Exception):
    """Something the user can fix: a bad file, field or value. The message names it."""


class DataError(RouterError):
    """Training or evaluation data is missing, malformed or does not fit the request."""


class RouterFolderError(RouterError):
    """A router folder is missing a file, or a file does not match its manifest."""


def shown(name: object, limit: int = 200) -> str:
    """A file name as an error message shows it: cut at `limit` characters."""
    text = str(name)
    return text if len(text) <= limit else f"{text[:limit]}..."


def not_a_file(path, missing: str = "no such file") -> str:
    """Why `path` cannot be read as a file: a folder, or `missing`."""
    return f"{path}: a folder, not a file" if os.path.isdir(path) else f"{path}: {missing}"


def first_error(e) -> tuple[tuple, str]:
    """A pydantic ValidationError as one line's parts: its first error's location and message ("required" for a
    missing key, without pydantic's "Value error, " prefix). Each caller spells the location its own way."""
    err = e.errors()[0]
    return err["loc"], "required" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")


def first_index(bad) -> int | None:
    """The position of the first true value of `bad` (a boolean Series, array or sequence); None when none is."""
    import numpy as np

    hits = np.flatnonzero(np.asarray(bad, dtype=bool))
    return int(hits[0]) if hits.size else None


def plain(value: object) -> object:
    """A numpy scalar as the Python value it holds, so error messages read 7.0, not np.float64(7.0)."""
    import numpy as np

    return value.item() if isinstance(value, np.generic) else value


def first_bad(
    where: object,
    bad,
    message: str,
    values=None,
    error: type[RouterError] = DataError,
    unit: str = "row",
    first: int = 0,
) -> None:
    """Raise `error` naming the first row where `bad` is true, as `<where>: row <i>: <message> (got <value>)`: `values`
    (by position) gives the value, `unit` and `first` how rows are counted (`line`, 2: a CSV's lines under its header)."""
    i = first_index(bad)
    if i is None:
        return
    got = "" if values is None else f" (got {plain(values.iloc[i] if hasattr(values, 'iloc') else values[i])!r})"
    raise error(f"{where}: {unit} {i + first}: {message}{got}")
