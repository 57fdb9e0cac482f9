"""The service commands and config files: one-line errors, the example config, a real `serve` process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from typer.testing import CliRunner

from learned_router.cli import app
from learned_router.serving.service import Service
from learned_router.serving.config import load_config, parse_config
from serving_fixtures import ROOT, ROUTER_DIR, FakeProvider, ServerThread, free_port, wait_for
from learned_router.serving.app import create_app

needs_router = pytest.mark.skipif(
    not (ROUTER_DIR / "router.json").is_file(), reason=f"no trained router at {ROUTER_DIR}"
)
EXAMPLE = ROOT / "serving" / "config.example.yaml"
TIERS_EXAMPLE = ROOT / "serving" / "config.tiers.example.yaml"
runner = CliRunner()


def example(tmp_path) -> dict:
    """The example config with the test router and its spend and quality stores under tmp_path."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["router"]["path"] = str(ROUTER_DIR)
    cfg["budget"]["store"] = str(tmp_path / "spend.sqlite")
    cfg["quality"]["store"] = str(tmp_path / "quality.sqlite")
    return cfg


def write(tmp_path, cfg: dict):
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def serve_error(args: list[str], env: dict | None = None) -> str:
    result = runner.invoke(app, ["serve", *args], env=env)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_the_example_config_is_valid():
    cfg = load_config(EXAMPLE)
    weak, strong = cfg.tiers
    assert (weak.name, strong.name, strong.score) == ("weak", "strong", None)
    assert weak.score == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert [p.model for p in strong.providers] == ["gpt-4-1106-preview"]
    assert strong.providers[0].input_price_per_1m == 10 and weak.providers[0].output_price_per_1m == 0.6
    assert strong.providers[0].api_key_env == "STRONG_API_KEY"
    assert cfg.budget.period == "day" and cfg.data_classes == {"restricted": ["strong-demo"]}
    assert Path(cfg.router.path).resolve() == (ROOT / "models" / "default").resolve()  # from serving/, whatever the cwd
    for store in (cfg.budget.store, cfg.traffic.store, cfg.drift.reference):  # the demo writes where .gitignore expects
        assert Path(store).resolve().parent == ROOT.resolve() and Path(store).name.startswith("router-")


@needs_router
def test_relative_paths_are_from_the_config_files_folder(tmp_path, monkeypatch):
    from learned_router.tasktypes import types_path

    monkeypatch.setenv("STRONG_API_KEY", "x")
    monkeypatch.setenv("WEAK_API_KEY", "y")
    monkeypatch.setenv("JUDGE_API_KEY", "z")
    folder, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    (folder / "state").mkdir(parents=True)
    elsewhere.mkdir()
    (folder / "router").symlink_to(ROUTER_DIR.resolve(), target_is_directory=True)
    shutil.copy(types_path(), folder / "types.yaml")
    cfg = example(tmp_path)
    cfg["router"]["path"] = "router"
    cfg["budget"]["store"], cfg["traffic"]["store"] = "state/spend.sqlite", "state/traffic.sqlite"
    cfg["drift"]["reference"], cfg["task_types"]["file"] = "state/reference.json", "types.yaml"
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(elsewhere)
    for given in (folder / "config.yaml", Path("..") / "conf" / "config.yaml"):
        loaded = load_config(given)
        paths = [
            loaded.router.path,
            loaded.budget.store,
            loaded.traffic.store,
            loaded.drift.reference,
            loaded.task_types.file,
        ]
        assert [Path(p).resolve() for p in paths] == [
            (folder / p).resolve()
            for p in ("router", "state/spend.sqlite", "state/traffic.sqlite", "state/reference.json", "types.yaml")
        ]
    service = Service(loaded)
    assert Path(service.router.path).resolve() == ROUTER_DIR.resolve()  # the folder beside the config file
    assert (folder / "state" / "spend.sqlite").is_file()
    absolute = str(tmp_path / "spend.sqlite")
    assert load_config(write(folder, {**cfg, "budget": {**cfg["budget"], "store": absolute}})).budget.store == absolute
    assert parse_config(cfg).router.path == "router"  # a config given as a dict: from the working directory


def test_the_three_tier_example_config_serves_with_the_shipped_router(tmp_path, monkeypatch):
    cfg = yaml.safe_load(TIERS_EXAMPLE.read_text())
    cfg["router"]["path"] = str(TIERS_EXAMPLE.parent / cfg["router"]["path"])
    cfg["budget"]["store"] = str(tmp_path / "spend.sqlite")
    for env in ("SMALL_API_KEY", "WEAK_API_KEY", "STRONG_API_KEY"):
        monkeypatch.setenv(env, "sk-fake")
    with FakeProvider(name="small") as small, FakeProvider(name="medium") as medium, FakeProvider(name="top") as top:
        for tier, fake in zip(cfg["tiers"], (small, medium, top)):
            tier["providers"][0]["base_url"] = fake.base_url
        with ServerThread(create_app(Service(parse_config(cfg)))) as service:
            c = openai.OpenAI(base_url=service.url + "/v1", api_key="sk-router-demo", max_retries=0)
            route = httpx.post(
                service.url + "/v1/route",
                headers={"Authorization": "Bearer sk-router-demo"},
                json={"model": "router", "messages": [{"role": "user", "content": "Name three primes."}]},
            ).json()
            assert set(route["pass_chances"]) == {"small", "medium", "top"} and route["threshold"] == 0.85
            assert route["rule"] == "score" and route["estimated_cost_usd"] > 0
            for threshold, tier in (("0", "small"), ("1", "top")):
                r = c.chat.completions.with_raw_response.create(
                    model=f"router-{threshold}", messages=[{"role": "user", "content": "Name three primes."}]
                )
                assert r.headers["x-router-tier"] == tier and r.headers["x-router-provider"] == f"{tier}-demo"
            small.control(
                mode="error"
            )  # the small tier fails: fallbacks go up, to medium, unless the data class forbids it
            ask = lambda **kw: c.chat.completions.with_raw_response.create(  # noqa: E731
                model="router-0", messages=[{"role": "user", "content": "Name three primes."}], **kw
            )
            r = ask(extra_body={"router": {"data_class": "restricted"}})
            assert (r.headers["x-router-tier"], r.headers["x-router-provider"]) == ("small", "top-demo")
            assert medium.stats()["requests"] == 0  # restricted data never went to a provider outside its list
            assert ask().headers["x-router-provider"] == "medium-demo"


def test_bad_configs_are_one_line_errors_naming_the_key(tmp_path):
    assert "config file not found" in serve_error(["--config", str(tmp_path / "none.yaml")])
    (tmp_path / "broken.yaml").write_text("router: [unclosed\n")
    assert "not valid YAML" in serve_error(["--config", str(tmp_path / "broken.yaml")])
    cfg = example(tmp_path)
    cfg["tiers"][1]["providers"][0]["base_url"] = "localhost:9001"
    assert "tiers[1].providers[0].base_url: must be an http(s) URL" in serve_error(
        ["--config", str(write(tmp_path, cfg))]
    )
    cfg = example(tmp_path)
    cfg["routing"]["strong_fracton"] = 0.3  # a typo: the nearest key is named
    assert serve_error(["--config", str(write(tmp_path, cfg))]).endswith(
        "routing.strong_fracton: Extra inputs are not permitted; did you mean 'strong_fraction'?"
    )


def test_missing_key_variable_and_router_folder_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("STRONG_API_KEY", "x")
    monkeypatch.setenv("WEAK_API_KEY", "y")
    monkeypatch.setenv("JUDGE_API_KEY", "z")
    cfg = example(tmp_path)
    cfg["router"]["path"] = str(tmp_path / "no-router")
    assert "router folder not found" in serve_error(["--config", str(write(tmp_path, cfg))])
    if not (ROUTER_DIR / "router.json").is_file():
        return
    cfg = example(tmp_path)
    cfg["tiers"][0]["score"] = "gpt-5"
    msg = serve_error(["--config", str(write(tmp_path, cfg))])
    assert (
        "tiers[0].score: the router outputs no 'gpt-5' (" in msg
        and "closest: gpt-" in msg
        and "'generic' scores any" in msg
    )
    cfg = example(tmp_path)
    cfg["budget"]["store"] = str(tmp_path / "a-file" / "spend.sqlite")
    (tmp_path / "a-file").write_text("not a folder")
    assert "budget.store: cannot use" in serve_error(["--config", str(write(tmp_path, cfg))])
    monkeypatch.delenv("WEAK_API_KEY")
    msg = serve_error(["--config", str(write(tmp_path, example(tmp_path)))])
    assert "tiers[0].providers[0].api_key_env: environment variable WEAK_API_KEY is not set" in msg


def test_a_port_out_of_range_or_in_use_is_one_line_before_the_router_loads(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("STRONG_API_KEY", "x")
    monkeypatch.setenv("WEAK_API_KEY", "y")
    monkeypatch.setenv("JUDGE_API_KEY", "z")
    cfg = write(tmp_path, example(tmp_path))
    r = CliRunner().invoke(app, ["serve", "--config", str(cfg), "--port", "99999"])
    assert r.exit_code == 2 and "--port" in r.output and "65535" in r.output and "Traceback" not in r.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        msg = serve_error(["--config", str(cfg), "--port", str(port)])
    assert msg == f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use)"


@needs_router
def test_strong_fraction_resolves_through_the_calibration_table(monkeypatch, tmp_path):
    monkeypatch.setenv("STRONG_API_KEY", "x")
    monkeypatch.setenv("WEAK_API_KEY", "y")
    monkeypatch.setenv("JUDGE_API_KEY", "z")
    cfg = example(tmp_path)
    service = Service(parse_config(cfg))
    assert service.threshold == pytest.approx(service.router.manifest.threshold_for(0.5))
    cfg["routing"] = {"threshold": 0.123}
    assert Service(parse_config(cfg), router=service.router).threshold == 0.123
    cfg["routing"] = {}
    assert Service(parse_config(cfg), router=service.router).threshold == service.router.default_threshold


@needs_router
def test_serve_command_runs_the_service(tmp_path):
    """`learned-router serve` as users run it: a subprocess with the example config on free ports."""
    keys = {
        "STRONG_API_KEY": "sk-prov-strong-cli-SECRET",
        "WEAK_API_KEY": "sk-prov-weak-cli-SECRET",
        "JUDGE_API_KEY": "sk-judge-cli-SECRET",
    }
    with (
        FakeProvider(name="strong", model="gpt-4-1106-preview", api_key=keys["STRONG_API_KEY"]) as strong,
        FakeProvider(name="weak", model="mixtral", api_key=keys["WEAK_API_KEY"]) as weak,
    ):
        cfg = example(tmp_path)
        cfg["tiers"][1]["providers"][0]["base_url"] = strong.base_url
        cfg["tiers"][0]["providers"][0]["base_url"] = weak.base_url
        port = free_port()
        env = {**os.environ, **keys, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from learned_router.cli import app; app()",
                "serve",
                "--config",
                str(write(tmp_path, cfg)),
                "--port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        try:
            url = f"http://127.0.0.1:{port}"

            def up():
                if proc.poll() is not None:
                    raise AssertionError(proc.stdout.read())
                try:
                    return httpx.get(url + "/readyz").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, timeout=60, interval=0.1)
            c = openai.OpenAI(base_url=url + "/v1", api_key="sk-router-demo", max_retries=0)
            r = c.chat.completions.with_raw_response.create(
                model="router-1", messages=[{"role": "user", "content": "hi"}]
            )
            assert r.parse().model == "gpt-4-1106-preview" and r.headers["x-router-tier"] == "strong"
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=20)
        assert "chat id=" in out and "POST /v1/chat/completions" in out
        assert "SECRET" not in out and "sk-router-demo" not in out


def test_fake_provider_command_rejects_a_bad_mode():
    result = runner.invoke(app, ["fake-provider", "--mode", "explode"])
    assert result.exit_code == 2 and "--mode" in result.output


def test_the_scorer_and_the_service_import_neither_torch_nor_the_tools():
    code = (
        "import sys, learned_router.scorer, learned_router.serving.app; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'sentence_transformers', 'transformers') "
        "or m.startswith('learned_router.tools')]; "
        "assert not bad, bad; "
        "import learned_router.tools.bench_serve, learned_router.tools.fake_provider; "  # the demo's tools: no torch
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
