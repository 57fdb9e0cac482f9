"""Hostile clients against the real service: invalid Unicode, a poisoned batch, a corpus of bad requests over one
keep-alive connection, unexpected handler errors, clients that hang up mid-body; never a 500 a client did not earn."""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import logging
import re
import socket
import time

import httpx
import pytest

from learned_router.serving.middleware import RedactQuery
from learned_router.serving.slowclients import HeaderTimeoutProtocol
from serving_fixtures import (
    needs_router,
    CLIENT_KEY,
    ROUTER_DIR,
    FakeProvider,
    provider_entry,
    service_config,
    start_service,
    two_tiers,
    wait_for,
)

pytestmark = [
    needs_router,
    pytest.mark.slow,  # the service on a real socket: connections, concurrency and streams cut mid-way are the subject
]

STRONG, WEAK = "gpt-4-1106-preview", "mixtral-8x7b"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
GOOD = {"model": "router-0", "messages": [{"role": "user", "content": "Name three prime numbers."}]}
POISON = "POISON-PILL"


class PoisonRouter:
    """The real router, except that a batch holding POISON fails as a tokenizer would on a lone surrogate."""

    def __init__(self, router):
        self.router, self.models, self.manifest = router, router.models, router.manifest
        self.default_threshold = router.default_threshold
        self.batches: list[int] = []

    def predict(self, prompts):
        self.batches.append(len(prompts))
        if any(POISON in p for p in prompts):
            raise ValueError("the tokenizer refused the text")
        return self.router.predict(prompts)


@pytest.fixture(scope="module")
def stack():
    from learned_router.scorer import Router

    with FakeProvider(name="weak", model=WEAK) as weak, FakeProvider(name="strong", model=STRONG) as strong:
        cfg = service_config(
            two_tiers(
                [provider_entry("weak", weak, None, WEAK, (0.6, 0.6))],
                [provider_entry("strong", strong, None, STRONG, (10, 30))],
            ),
            router={"max_wait_ms": 20},
            rate_limit={"burst": 200},  # 64 requests at once are not a flood here
        )
        router = PoisonRouter(Router.load(ROUTER_DIR))
        with start_service(cfg, router=router) as service:
            yield {
                "url": service.url,
                "port": service.port,
                "service": service.app.state.service,
                "router": router,
                "weak": weak,
                "strong": strong,
            }


def statuses(stack, endpoint: str = "/v1/chat/completions") -> dict[str, float]:
    text = httpx.get(stack["url"] + "/metrics").text
    return {
        m[0]: float(m[1])
        for m in re.findall(rf'router_requests_total\{{endpoint="{endpoint}",status="(\d+)"\}} (\S+)', text)
    }


SURROGATE_FIELDS = [
    ('{"model":"router","messages":[{"role":"user","content":"\\ud800"}]}', "messages.0.content"),
    (
        '{"model":"router","messages":[{"role":"system","content":"be \\udfff nice"},{"role":"user","content":"hi"}]}',
        "messages.0.content",
    ),
    ('{"model":"router","messages":[{"role":"user","content":"hi"}],"user":"u\\ud83d"}', "user"),
    (
        '{"model":"router","messages":[{"role":"user","content":[{"type":"text","text":"\\ud800x"}]}]}',
        "messages.0.content.0.text",
    ),
    ('{"model":"router","messages":[{"role":"user","content":"hi","name":"\\udc00"}]}', "messages.0.name"),
    ('{"model":"router\\ud800","messages":[{"role":"user","content":"hi"}]}', "model"),
    (
        '{"model":"router","messages":[{"role":"user","content":"hi"}],"metadata":{"k":["ok","\\ud800"]}}',
        "metadata.k.1",
    ),
    (
        '{"model":"router","messages":[{"role":"user","content":"hi"}],"router":{"data_class":"\\ud800"}}',
        "router.data_class",
    ),
]


@pytest.mark.parametrize("body, field", SURROGATE_FIELDS)
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(stack, body, field):
    for path in ("/v1/chat/completions", "/v1/route"):
        r = httpx.post(stack["url"] + path, content=body, headers=AUTH)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == field and err["code"] == "invalid_unicode" and field in err["message"]


@pytest.mark.parametrize(
    "raw, field",
    [
        ('"temperature":1e309', "temperature"),
        ('"metadata":{"a":[1e999]}', "metadata.a.0"),
        ('"stream":true,"top_p":-1e309', "top_p"),
    ],
)
def test_a_number_no_float_holds_is_a_400_naming_the_field(stack, raw, field):
    body = '{"model":"router","messages":[{"role":"user","content":"hi"}],' + raw + "}"
    for path in ("/v1/chat/completions", "/v1/route"):
        r = httpx.post(stack["url"] + path, content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert "outside the range of a 64-bit float" in r.json()["error"]["message"]
    r = httpx.post(
        stack["url"] + "/v1/chat/completions", headers=AUTH, json={**GOOD, "stream": True, "stream_options": "yes"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text


def test_a_surrogate_in_a_key_is_a_400_too(stack):
    r = httpx.post(
        stack["url"] + "/v1/chat/completions",
        headers=AUTH,
        content='{"model":"router","messages":[{"role":"user","content":"hi"}],"x\\ud800":1}',
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_unicode"


def test_one_bad_prompt_fails_alone_never_its_batch(stack):
    """16 honest clients and one sending prompts the scorer refuses, batched together: only the bad ones fail."""
    router = stack["router"]
    router.batches.clear()

    async def main():
        async with httpx.AsyncClient(base_url=stack["url"], headers=AUTH, timeout=30) as c:

            async def one(i: int):
                text = f"{POISON} {i}" if i % 8 == 3 else f"What is {i} times {i + 1}?"
                return i, await c.post(
                    "/v1/chat/completions", json={"model": "router-0", "messages": [{"role": "user", "content": text}]}
                )

            return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(main())
    bad = [r for i, r in results if i % 8 == 3]
    good = [r for i, r in results if i % 8 != 3]
    assert all(r.status_code == 200 for r in good), [r.text for r in good if r.status_code != 200][:3]
    assert all(r.status_code == 500 and r.json()["error"]["code"] == "router_error" for r in bad)
    assert max(router.batches) > 1  # they were batched together, and the honest ones still got their answers


def test_an_unexpected_error_is_a_complete_500_and_the_keep_alive_connection_survives(stack, monkeypatch, caplog):
    service = stack["service"]
    real = service.upstream.complete

    async def explode(chain, body, stream, deadline=None):
        if "explode" in json.dumps(body):
            raise RuntimeError("a bug")
        return await real(chain, body, stream, deadline)

    monkeypatch.setattr(service.upstream, "complete", explode)
    conn = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=10)
    bad = json.dumps({"model": "router-0", "messages": [{"role": "user", "content": "please explode"}]})
    with caplog.at_level(logging.ERROR, logger="learned_router.serving"):
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions", body=bad, headers=AUTH)
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 500 and body == {
                "error": {"message": "internal error", "type": "server_error", "param": None, "code": None}
            }
            assert (r.getheader("connection") or "").lower() != "close"
            conn.request("POST", "/v1/chat/completions", body=json.dumps(GOOD), headers=AUTH)  # same connection
            ok = conn.getresponse()
            assert ok.status == 200 and json.loads(ok.read())["model"] == WEAK
    conn.close()
    lines = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert lines and all("\n" not in m and "RuntimeError" in m for m in lines)  # one line each, no traceback


def test_a_surrogate_in_a_system_message_leaves_the_keep_alive_neighbour_alone(stack):
    conn = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=10)
    conn.request("POST", "/v1/chat/completions", headers=AUTH, body=SURROGATE_FIELDS[1][0])
    r = conn.getresponse()
    assert r.status == 400 and json.loads(r.read())["error"]["param"] == "messages.0.content"
    conn.request("POST", "/v1/chat/completions", body=json.dumps(GOOD), headers=AUTH)
    assert conn.getresponse().status == 200
    conn.close()


def hostile_corpus() -> list[tuple[str, dict, bytes]]:
    """(what, headers, body) of >= 100 hostile requests, each to be answered with a 4xx in OpenAI's error format."""
    h, items = AUTH, []

    def add(what, body, headers=h):
        items.append((what, headers, body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")))

    def chat(**fields):
        return json.dumps({"model": "router", "messages": [{"role": "user", "content": "hi"}], **fields})

    for raw in [
        "",
        "{",
        "}",
        "[]",
        "null",
        "1",
        '"x"',
        "true",
        "{'a': 1}",
        '{"model":',
        "\x00",
        "\ufeff{}",
        "{}{}",
        '{"model":"router","messages":[]}garbage',
        '{"a":NaN}',
        '{"a":Infinity}',
        '{"a":-Infinity}',
    ]:
        add(f"not a JSON object: {raw!r}", raw)
    for raw in [b"\xff\xfe", b"\xc3\x28", b'{"model":"\xed\xa0\x80"}', b"\x80abc", b'{"m":"\xf0\x28\x8c\xbc"}']:
        add(f"not UTF-8: {raw!r}", raw)
    add("deep nesting", "[" * 30_000 + "]" * 30_000)
    add("deep object", '{"a":' * 10_000 + "1" + "}" * 10_000)
    for model in [
        "",
        "gpt-4",
        "router-",
        "router-2",
        "router--1",
        "router-0.5\n",
        "router-0.5 ",
        " router",
        "router-nan",
        "router-inf",
        "router-1e-1",
        "router-0x1",
        "ROUTER",
        "router-0.5\x00",
        "router-١",
    ]:
        add(f"model {model!r}", chat(model=model))
    for model in [None, 1, 0.5, True, [], {}]:
        add(f"model of type {type(model).__name__}", chat(model=model))
    for messages in [
        None,
        [],
        {},
        "hi",
        1,
        [None],
        [1],
        ["hi"],
        [{}],
        [{"content": "hi"}],
        [{"role": "robot", "content": "hi"}],
        [{"role": "user", "content": 1}],
        [{"role": "user", "content": {"text": "hi"}}],
        [{"role": "user", "content": [1]}],
        [{"role": "user", "content": [{"text": "no type"}]}],
        [{"role": "user", "content": [{"type": 1}]}],
        [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        [[]],
        [{"role": None}],
    ]:
        add(f"messages {str(messages)[:40]}", json.dumps({"model": "router", "messages": messages}))
    for field, value in [
        ("stream", "yes"),
        ("stream", 1),
        ("stream", None),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("max_tokens", 1.5),
        ("max_tokens", "10"),
        ("max_tokens", True),
        ("max_completion_tokens", -5),
        ("max_tokens", 10**40),
        ("max_tokens", 2**63),
        ("router", "fast"),
        ("router", []),
        ("router", {"latency_budget_ms": -1}),
        ("router", {"latency_budget_ms": 0}),
        ("router", {"latency_budget_ms": "5"}),
        ("router", {"latency_budget_ms": 1e400}),
        ("router", {"data_class": 1}),
        ("router", {"data_class": "secret"}),
        ("router", {"unknown": 1}),
        ("router", {"data_class": None, "x": 2}),
    ]:
        add(f"{field}={value!r}", chat(**{field: value}))
    for raw in ['"temperature":1e309', '"top_p":-1e309', '"metadata":{"a":[1e999]}', '"n":1e400']:
        for stream in ("", ',"stream":true'):  # numbers no float holds: JSON reads them as infinity
            add(f"{raw}{stream}", '{"model":"router","messages":[{"role":"user","content":"hi"}],' + raw + stream + "}")
    for value in ["yes", [1, 2], 3, True]:
        add(f"stream_options={value!r}", chat(stream=True, stream_options=value))
    for s in ["\ud800", "\udfff", "a\ud83d", "\udc00b", "\ud800\ud800"]:
        add(
            f"surrogate {s!r} in content", json.dumps({"model": "router", "messages": [{"role": "user", "content": s}]})
        )
        add(f"surrogate {s!r} in user", chat(user=s))
        add(
            f"surrogate {s!r} in a system turn",
            json.dumps(
                {"model": "router", "messages": [{"role": "system", "content": s}, {"role": "user", "content": "hi"}]}
            ),
        )
        add(f"surrogate {s!r} in a tool name", chat(tools=[{"type": "function", "function": {"name": s}}]))
    for header, value in [
        ("x-router-latency-budget-ms", "soon"),
        ("x-router-latency-budget-ms", "-5"),
        ("x-router-latency-budget-ms", "nan"),
        ("x-router-latency-budget-ms", "inf"),
        ("x-router-data-class", "nope"),
        ("x-router-data-class", "\u00e9t\u00e9"),
    ]:
        add(f"header {header}: {value!r}", chat(), {**h, header: value.encode("utf-8").decode("latin-1")})
    for auth in [None, "Bearer", "Bearer ", "Basic abc", "Bearer wrong-key", "bearer " + "x" * 5000]:
        headers = {k: v for k, v in h.items() if k != "Authorization"}
        if auth is not None:
            headers["Authorization"] = auth
        add(f"authorization {str(auth)[:20]!r}", chat(), headers)
    add("body over the limit", chat(pad="x" * 70_000))
    return items


def test_a_corpus_of_hostile_requests_gets_only_4xx_over_one_keep_alive_connection(stack):
    corpus = hostile_corpus()
    assert len(corpus) >= 100
    paths = ("/v1/chat/completions", "/v1/route")
    before = {p: statuses(stack, p) for p in paths}
    seen = {p: collections.Counter() for p in paths}  # what the clients received
    conn = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=30)
    failures = []
    for what, headers, body in corpus:
        for path in ("/v1/chat/completions", "/v1/route"):
            try:
                conn.request("POST", path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                closing = (r.getheader("connection") or "").lower() == "close"
                seen[path][str(r.status)] += 1
            except (http.client.HTTPException, OSError) as e:
                failures.append(f"{what} {path}: connection lost ({type(e).__name__})")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=30)
                continue
            err = json.loads(data).get("error") if data.startswith(b"{") else None
            if not (400 <= r.status < 500 and err and set(err) == {"message", "type", "param", "code"}):
                failures.append(f"{what} {path}: {r.status} {data[:120]!r}")
            if closing:  # only a body the service would not read closes the connection, and says so
                assert what == "body over the limit", what
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=30)
    conn.close()
    assert not failures, "\n".join(failures[:20])
    for p in paths:  # the metrics count what the clients received, status by status
        after = statuses(stack, p)
        assert {k: after[k] - before[p].get(k, 0) for k in after if after[k] != before[p].get(k, 0)} == dict(seen[p])
    assert httpx.post(stack["url"] + "/v1/chat/completions", json=GOOD, headers=AUTH).status_code == 200


def test_a_client_that_hangs_up_mid_body_is_counted_as_499_not_500(stack):
    before = statuses(stack)
    with socket.create_connection(("127.0.0.1", stack["port"])) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + CLIENT_KEY.encode()
            + b'\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model":'
        )
        time.sleep(0.2)
    wait_for(lambda: statuses(stack).get("499", 0) == before.get("499", 0) + 1)
    assert statuses(stack).get("500", 0) == before.get("500", 0)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "You answer in French."}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": None}],
        [{"role": "assistant", "content": "only me"}],
    ],
)
def test_requests_openai_answers_are_answered_not_refused(stack, messages):
    r = httpx.post(stack["url"] + "/v1/chat/completions", json={"model": "router", "messages": messages}, headers=AUTH)
    assert r.status_code == 200, r.text
    if not any(isinstance(m["content"], str) and m["content"] for m in messages):  # nothing to score: the top tier
        assert (
            r.headers["x-router-tier"] == "strong"
            and r.headers["x-router-pass-chances"] == "weak=0.0000, strong=1.0000"
        )


def test_api_docs_are_off_by_default(stack):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(stack["url"] + path).status_code == 404


def test_api_docs_can_be_switched_on():
    with FakeProvider(name="weak", model=WEAK) as weak:
        entry = provider_entry("weak", weak, None, WEAK, (0.6, 0.6))
        cfg = service_config(two_tiers([entry], [{**entry, "name": "strong"}]))
        cfg["api_docs"] = True
        with start_service(cfg) as service:
            assert httpx.get(service.url + "/openapi.json").json()["info"]["title"] == "learned-router"
            assert httpx.get(service.url + "/docs").status_code == 200


def test_the_api_docs_show_the_routing_decisions_schema(stack):
    weak, strong = (
        provider_entry(name, stack[name], None, model, (1, 1)) for name, model in (("weak", WEAK), ("strong", STRONG))
    )
    with start_service({**service_config(two_tiers([weak], [strong])), "api_docs": True}) as service:
        decision = httpx.post(service.url + "/v1/route", json=GOOD, headers=AUTH).json()
        spec = httpx.get(service.url + "/openapi.json").json()
    schema = spec["paths"]["/v1/route"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    fields = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert {"tier", "rule", "reason", "pass_chances", "threshold", "effective_threshold", "budget", "router"} <= set(
        fields
    )
    assert list(fields) == list(decision)  # every field the endpoint returns, in its order
    assert fields["pass_chances"]["additionalProperties"] == {"type": "number"}


def test_access_log_lines_never_show_a_query_string_value(stack):
    assert any(isinstance(f, RedactQuery) for f in logging.getLogger("uvicorn.access").filters)  # installed at start-up
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", "/v1/chat/completions?api_key=sk-secret&x=1", "1.1", 401),
        None,
    )
    assert RedactQuery().filter(record)
    line = record.getMessage()
    assert "sk-secret" not in line and "/v1/chat/completions?api_key=[redacted]&x=[redacted]" in line


class QuickHeaders(HeaderTimeoutProtocol):
    header_timeout_s = 0.5


def test_a_client_that_never_finishes_its_headers_is_disconnected():
    with FakeProvider(name="weak", model=WEAK) as weak:
        entry = provider_entry("weak", weak, None, WEAK, (0.6, 0.6))
        with start_service(
            service_config(two_tiers([entry], [{**entry, "name": "strong"}])), http=QuickHeaders
        ) as service:
            port = service.port
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for _ in range(2):  # honest requests on one keep-alive connection are unaffected
                conn.request("POST", "/v1/chat/completions", body=json.dumps(GOOD), headers=AUTH)
                assert conn.getresponse().read() and conn.sock is not None
                time.sleep(0.7)  # idle between requests: uvicorn's keep-alive timeout (5 s) applies, not this one
            conn.close()
            for opening in (b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "):
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.settimeout(5)
                    s.sendall(opening)
                    t0 = time.monotonic()
                    while s.recv(1024):  # a client trickling its headers: cut off after 0.5 s
                        pass
                    assert time.monotonic() - t0 < 2


def test_a_client_that_never_finishes_its_body_gets_a_408_and_is_disconnected():
    with FakeProvider(name="weak", model=WEAK) as weak:
        entry = provider_entry("weak", weak, None, WEAK, (0.6, 0.6))
        cfg = service_config(two_tiers([entry], [{**entry, "name": "strong"}]), limits={"body_read_seconds": 0.5})
        with start_service(cfg) as service:
            with socket.create_connection(("127.0.0.1", service.port)) as s:
                s.settimeout(5)
                s.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + CLIENT_KEY.encode()
                    + b'\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model":'
                )
                t0, reply = time.monotonic(), b""
                while chunk := s.recv(4096):  # the server answers, then closes the connection
                    reply += chunk
                assert time.monotonic() - t0 < 3
            assert reply.startswith(b"HTTP/1.1 408") and b"limits.body_read_seconds" in reply
            conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)  # an honest client is unaffected
            conn.request("POST", "/v1/chat/completions", body=json.dumps(GOOD), headers=AUTH)
            assert conn.getresponse().status == 200
