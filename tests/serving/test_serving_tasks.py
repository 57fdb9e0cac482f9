"""Task types in the service: inferred or named per request, in /v1/route, the headers, the log and the metrics; the
rules a type carries (a threshold offset, a cheapest tier), explained like the others; routers without embeddings."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from learned_router import Router
from learned_router.serving.config import ConfigError, parse_config
from learned_router.serving.service import Service
from serving_fixtures import (
    needs_router,
    CLIENT_KEY,
    ROUTER_DIR,
    FakeProvider,
    provider_entry,
    service_config,
    in_process,
    two_tiers,
)

pytestmark = needs_router

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
CODE = "Write a Python function that merges two sorted lists into one sorted list."
HELLO = "hi! how are you today?"
TRANSLATE = "Translate 'the shop opens at nine' into Spanish."


@pytest.fixture(scope="module")
def fakes():
    with (
        FakeProvider(name="weak-a", model="weak-model") as weak,
        FakeProvider(name="strong-a", model="strong-model") as strong,
    ):
        yield {"weak": weak, "strong": strong}


def config(fakes, **task_types) -> dict:
    return service_config(
        two_tiers(
            [provider_entry("weak-a", fakes["weak"], None, "weak-model", (0.1, 0.1))],
            [provider_entry("strong-a", fakes["strong"], None, "strong-model", (10, 30))],
        ),
        task_types=task_types,
    )


@pytest.fixture(scope="module")
def service(fakes):
    with in_process(config(fakes, min_tier={"code": "strong"}, threshold_offsets={"translation": 0.5})) as s:
        yield s


def route(http, text: str, model: str = "router-0", headers: dict | None = None, **body) -> httpx.Response:
    return http.post(
        "/v1/route",
        json={"model": model, "messages": [{"role": "user", "content": text}], **body},
        headers=AUTH | (headers or {}),
    )


def test_each_request_gets_a_type_in_route_headers_log_and_metrics(service, caplog):
    for text, kind in [(HELLO, "chitchat"), (TRANSLATE, "translation"), (CODE, "code")]:
        d = route(service, text).json()
        assert (d["task_type"], d["task_type_source"]) == (kind, "inferred")
    with caplog.at_level(logging.INFO, logger="learned_router.serving"):
        r = service.post(
            "/v1/chat/completions",
            headers=AUTH,
            json={"model": "router-0", "messages": [{"role": "user", "content": HELLO}]},
        )
    assert r.status_code == 200 and r.headers["x-router-task-type"] == "chitchat"
    assert any("task_type=chitchat" in m for m in caplog.messages)
    text = service.get("/metrics").text
    assert re.search(
        r'^router_decisions_total\{router="[^"]+",rule="task_type",task_type="code",tier="strong"\} [1-9]', text, re.M
    )
    assert re.search(
        r'^router_cost_usd_total\{model="weak-model",provider="weak-a",task_type="chitchat"\} \S+', text, re.M
    )


def test_a_request_may_name_its_type_and_an_unknown_one_is_a_400_naming_it(service):
    d = route(service, CODE, headers={"x-router-task-type": "math"}).json()
    assert (d["task_type"], d["task_type_source"], d["tier"]) == ("math", "request", "weak")  # math is not pinned
    assert route(service, HELLO, router={"task_type": "code"}).json()["tier"] == "strong"
    r = route(service, HELLO, headers={"x-router-task-type": "poetry"})
    err = r.json()["error"]
    assert r.status_code == 400 and "'poetry'" in err["message"] and "code, math" in err["message"]
    assert err["param"] == "router.task_type" and err["code"] == "unknown_task_type"
    r = route(service, HELLO, headers={"x-router-task-type": "code"}, router={"task_type": "math"})
    assert r.status_code == 400 and "disagree" in r.json()["error"]["message"]
    r = route(service, HELLO, router={"task_type": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "router.task_type"


def test_type_rules_are_applied_with_the_others_and_explained(service):
    d = route(service, CODE).json()  # router-0: every pass chance clears, yet code is pinned to strong
    assert (d["tier"], d["rule"]) == ("strong", "task_type")
    assert d["skipped"] == [
        {"tier": "weak", "rule": "task_type", "detail": "weak-a: task type 'code' goes to tier strong or above"}
    ]
    assert "weak cannot take it" in d["reason"]
    low = route(service, TRANSLATE, "router-0.4").json()  # +0.5: 0.9, above the weak tier's pass chance here
    assert low["threshold"] == pytest.approx(0.9) and low["pass_chances"]["weak"] < 0.9
    assert (low["tier"], low["rule"]) == ("strong", "task_type") and "moves the threshold from 0.4000 to 0.9000" in low[
        "reason"
    ]
    d = route(service, TRANSLATE, "router-0.9").json()  # clipped at 1
    assert d["threshold"] == 1.0 and d["rule"] == "score"


class WithoutEmbedding:
    """A router exported before the graph had its embedding output."""

    def __init__(self, router: Router):
        self.predict, self.models, self.manifest = router.predict, router.models, router.manifest
        self.default_threshold = router.default_threshold


def test_a_router_without_embeddings_serves_with_named_types_only(fakes, caplog):
    with caplog.at_level(logging.WARNING, logger="learned_router.serving"):
        s = in_process(
            config(fakes, min_tier={"code": "strong"}), router=WithoutEmbedding(Router(ROUTER_DIR, threads=1))
        )
    assert any("no embedding output" in m and "re-export" in m for m in caplog.messages)
    with s:
        d = route(s, CODE).json()
        assert (d["task_type"], d["task_type_source"], d["tier"]) == ("unknown", "none", "weak")
        assert route(s, CODE, headers={"x-router-task-type": "code"}).json()["tier"] == "strong"


def test_type_config_errors_name_the_key(fakes):
    router = Router(ROUTER_DIR, threads=1)
    with pytest.raises(ConfigError, match="task_types.min_tier.code: unknown tier 'gold'"):
        parse_config(config(fakes, min_tier={"code": "gold"}))
    with pytest.raises(ConfigError, match="task_types.threshold_offsets.poetry: unknown task type"):
        Service(parse_config(config(fakes, threshold_offsets={"poetry": 0.1})), router=router)
    with pytest.raises(ConfigError, match="task_types.file: .*not found"):
        Service(parse_config(config(fakes, file="/nonexistent/types.yaml")), router=router)
