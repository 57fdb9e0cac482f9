"""Reading a YAML file: the one loader of every YAML file the package reads (the service config, task types, price
files, eval suites, sources.yaml).

Safe YAML only, and a mapping that repeats a key is refused (plain YAML keeps the last one silently, so a second
`auth:` would quietly replace the first). A missing file, bad YAML or a repeated key is one line naming the file,
and the line where the YAML goes wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import RouterError, not_a_file


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (the merge key `<<` aside)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (list, dict)):
                continue  # unhashable: the safe loader refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | os.PathLike, error: type[RouterError] = RouterError, missing: str = "no such file"):
    """The contents of the YAML file at `path` (None for an empty file). `error` (a RouterError class) is raised,
    as `<path>: <missing>` when there is no such file, or `<path>: not valid YAML (line N: what)`."""
    path = Path(path)
    if not path.is_file():
        raise error(not_a_file(path, missing))
    try:
        return yaml.load(path.read_bytes(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise error(f"{path}: not valid YAML ({where}{what})") from None
