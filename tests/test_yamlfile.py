"""One YAML loader: every YAML file the package reads refuses a repeated key, and bad YAML is one line naming the
file and line."""

from __future__ import annotations

import pytest

from learned_router.errors import DataError, RouterError
from learned_router.evals.results import load_suite
from learned_router.prices import load_prices
from learned_router.serving.config import load_config
from learned_router.serving.errors import ConfigError
from learned_router.tasktypes import TaskTypeError, load_types
from learned_router.yamlfile import load_yaml


def test_load_yaml_reads_safe_yaml_and_keeps_merge_keys(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("base: &b {x: 1}\nmore:\n  <<: *b\n  y: 2\n")
    assert load_yaml(path) == {"base": {"x": 1}, "more": {"x": 1, "y": 2}}
    path.write_text("")
    assert load_yaml(path) is None
    path.write_text("x: !!python/object:os.system ls\n")
    with pytest.raises(RouterError, match=r"not valid YAML \(line 1: "):
        load_yaml(path)


@pytest.mark.parametrize(
    "load, error",
    [
        (load_config, ConfigError),
        (load_prices, DataError),
        (load_types, TaskTypeError),
        (load_suite, RouterError),
    ],
)
def test_every_yaml_file_refuses_a_repeated_key_and_bad_yaml_in_one_line(tmp_path, load, error):
    path = tmp_path / "f.yaml"
    path.write_text("models:\n  a: 1\n  a: 2\n")
    with pytest.raises(error) as e:
        load(path)
    assert str(e.value) == f"{path}: not valid YAML (line 3: duplicate key 'a')"
    path.write_text("models: [unclosed\n")
    with pytest.raises(error) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: not valid YAML (line 2: ") and "\n" not in str(e.value)
    path.write_bytes(b"models: \xff\n")
    with pytest.raises(error) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: not valid YAML (") and "\n" not in str(e.value)
