"""bench-serve --compare: the same chat load to the upstream, this service and another OpenAI-compatible proxy."""

from __future__ import annotations

import re

import pytest

from clirun import cli
from serving_fixtures import ROUTER_DIR, FakeProvider, needs_router

pytestmark = needs_router


def bench(*args):
    return cli("bench-serve", "--router", ROUTER_DIR, *args)


@pytest.mark.slow
def test_compare_sends_the_same_load_to_each_target_and_prints_ratios():
    with FakeProvider(name="upstream", model="m") as upstream, FakeProvider(name="other", model="m") as other:
        r = bench(
            "--upstream",
            upstream.base_url,
            "--compare",
            f"other={other.base_url}",
            "--prompt-tokens",
            "120",
            "--chat-requests",
            "50",
        )
        assert r.returncode == 0, r.stderr
        cells = re.findall(r"^~(\d+) tokens, concurrency (\d+), (no stream|stream)", r.stdout, re.M)
        assert len(cells) == 4 and {c[0] for c in cells} == {"120"}, r.stdout
        assert len(re.findall(r"^  router +adds p50 .* errors 0$", r.stdout, re.M)) == 4, r.stdout
        assert len(re.findall(r"^  other +adds p50 .* errors 0$", r.stdout, re.M)) == 4, r.stdout
        assert len(re.findall(r"^  router / other: added p50 ", r.stdout, re.M)) == 4
        # the other "proxy" is a bare fake provider, which scores nothing: the router cannot add less latency than it,
        # and each verdict says so with the service's own scoring time, read from its /metrics
        verdicts = re.findall(r"^  targets vs other: added p50 (met|MISSED), .*$", r.stdout, re.M)
        assert verdicts.count("MISSED") >= 3, r.stdout
        spent = [float(x) for x in re.findall(r"spent ([\d.]+) ms per request scoring and routing", r.stdout)]
        assert len(spent) >= 3 and all(x > 0.1 for x in spent), r.stdout
        # every request of every target reached the upstream: direct, through the router, through the other proxy
        assert upstream.stats()["requests"] >= 4 * 50 * 2 and other.stats()["requests"] >= 4 * 50


@pytest.mark.parametrize(
    "args, message",
    [
        (("--compare", "nourl"), "--compare expects NAME=URL"),
        (("--compare", "x=ftp://a"), "x: expected an http(s) base URL"),
        (("--compare", "router=http://127.0.0.1:1/v1"), "'direct' and 'router' are taken"),
        (("--compare", "x=http://127.0.0.1:1/v1", "--compare-key-env", "y=K"), "'y' is not a --compare name"),
        (
            ("--compare", "x=http://127.0.0.1:1/v1", "--compare-key-env", "x=NO_SUCH_VARIABLE_SET"),
            "NO_SUCH_VARIABLE_SET is not set",
        ),
        (("--compare", "x=http://127.0.0.1:1/v1", "--prompt-tokens", "30,abc"), "--prompt-tokens: expected"),
    ],
)
def test_bad_compare_options_are_one_line(args, message):
    r = bench(*args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
