"""The deployment examples hold together: serving/compose.yaml and serving/k8s.yaml parse, their router config is a
valid service config on the Redis they run, and every key it names reaches the router's environment."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from conftest import ROOT
from learned_router.serving.config import ServiceConfig, parse_config

SERVING = ROOT / "serving"


def named_variables(cfg: ServiceConfig) -> set[str]:
    return {p.api_key_env for t in cfg.tiers for p in t.providers if p.api_key_env} | {cfg.state.password_env}


def test_compose_runs_replicas_on_one_redis_each_scraped_by_prometheus():
    compose = yaml.safe_load((SERVING / "compose.yaml").read_text())
    services, configs = compose["services"], compose["configs"]
    router = services["router"]
    assert router["deploy"]["replicas"] >= 2 and router["depends_on"]["redis"]["condition"] == "service_healthy"
    assert (SERVING / router["build"]["context"] / router["build"]["dockerfile"]).resolve() == SERVING / "Dockerfile"
    mount = router["configs"][0]
    assert mount["target"] == "/app/serving/config.yaml"  # where serving/Dockerfile's CMD reads it
    cfg = parse_config(yaml.safe_load(configs[mount["source"]]["content"]), "compose router-config")
    assert cfg.state.backend == "redis" and re.match(r"redis://redis:6379/", cfg.state.url)
    assert named_variables(cfg) <= set(router["environment"])
    assert "--requirepass" in services["redis"]["command"] and "--appendonly" in services["redis"]["command"]
    healthcheck = " ".join(router["healthcheck"]["test"])
    assert "/healthz" in healthcheck

    prometheus = yaml.safe_load(configs[services["prometheus"]["configs"][0]["source"]]["content"])
    (sd,) = prometheus["scrape_configs"][0]["dns_sd_configs"]
    assert sd["names"] == ["router"] and sd["type"] == "A" and sd["port"] == 8000
    nginx = configs[services["lb"]["configs"][0]["source"]]["content"]
    assert "server router:8000" in nginx and "location /metrics { return 404; }" in nginx


def test_kubernetes_manifest_mounts_the_config_probes_each_replica_and_reads_keys_from_a_secret():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all((SERVING / "k8s.yaml").read_text())}
    deployment = docs["Deployment", "learned-router"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert deployment["spec"]["replicas"] >= 2 and pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {container["readinessProbe"]["httpGet"]["port"]} == {p["name"] for p in container["ports"]}

    config_path = Path(container["args"][container["args"].index("--config") + 1])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    config_map = docs["ConfigMap", volume["configMap"]["name"]]
    cfg = parse_config(yaml.safe_load(config_map["data"][config_path.name]), "k8s ConfigMap")
    assert cfg.state.backend == "redis"
    redis_host = re.match(r"redis://([^:/]+)", cfg.state.url).group(1)
    assert ("Service", redis_host) in docs and ("StatefulSet", redis_host) in docs

    (secret,) = [e["secretRef"]["name"] for e in container["envFrom"]]
    redis_env = docs["StatefulSet", redis_host]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in redis_env} == {secret}
    assert named_variables(cfg) <= set(re.findall(r"--from-literal=(\w+)=", (SERVING / "k8s.yaml").read_text()))
    assert docs["Service", "learned-router"]["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
