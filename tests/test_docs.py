"""Documents that cannot drift: the generated config reference, the README's links and its test command."""

import re
from pathlib import Path

from learned_router.tools import configdoc
from learned_router.serving.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[1]


def test_the_config_reference_is_generated_and_current():
    text = configdoc.render()
    assert (ROOT / "serving" / "CONFIG.md").read_text() == text, (
        "regenerate: python -m learned_router.tools.configdoc > serving/CONFIG.md"
    )
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert all(not line.endswith("|  |") for line in rows), "a key without a meaning: comment it in config.py"
    keys = {
        path: {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
        for path, section in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    }
    assert keys["top level"] == set(ServiceConfig.model_fields) and "base_url" in keys["tiers[].providers[]"]
    assert "| `threads` | int or null (>= 1) | `1` |" in text  # type, bounds and default from the model


def test_the_readmes_links_resolve_and_the_readme_names_the_command_ci_runs():
    for doc in (ROOT / "README.md", ROOT / "serving" / "README.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to a missing {target}"
    readme = (ROOT / "README.md").read_text()
    assert (ROOT / "examples" / "prompts.jsonl").is_file() and "--file examples/prompts.jsonl" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and ".venv/bin/python -m pytest -q" in readme
