"""Learning from one's own traffic, end to end on the fake providers: requests through the service are recorded, a
client gives feedback, `traffic export` -> `label` (a fake judge) -> `train --prior` (the router in service as the
prior, logged to the real MLflow server) -> `eval --against` -> `calibrate` -> reload. The weak fake model fails on one recognisable kind of prompt (proofs);
the reloaded service must send that kind to the strong tier, the rest to the weak one, at the share of strong calls
asked for."""

from __future__ import annotations

import itertools
import random

import httpx
import openai
import pandas as pd
import yaml

from clirun import cli as run_cli
from serving_fixtures import (
    needs_router,
    CLIENT_KEY,
    PROVIDER_KEYS,
    ROUTER_DIR,
    FakeProvider,
    provider_entry,
    service_config,
    start_service,
    two_tiers,
)
from learned_router.serving.config import hash_key

pytestmark = needs_router

ADMIN_KEY = "sk-router-test-admin-loop"
STRONG_MODEL = "gpt-4-1106-preview"
WEAK_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
TARGET = 0.3  # the share of strong calls asked for; also the share of proofs in the traffic

PROOFS = [
    "there are infinitely many primes",
    "the square root of 2 is irrational",
    "every tree with n nodes has n-1 edges",
    "the sum of the first n odd numbers is n squared",
    "a bipartite graph has no odd cycle",
    "the harmonic series diverges",
    "every finite integral domain is a field",
    "there is no largest prime gap",
    "the composition of two bijections is a bijection",
    "a continuous function on [a, b] attains its maximum",
    "the product of two odd numbers is odd",
    "every group of prime order is cyclic",
    "the determinant of a product is the product of the determinants",
    "e is irrational",
    "any two bases of a vector space have the same size",
    "the halting problem is undecidable",
    "log 3 / log 2 is irrational",
    "the set of real numbers is uncountable",
    "a planar graph has a vertex of degree at most 5",
    "Fermat's little theorem holds",
    "the geometric mean never exceeds the arithmetic mean",
    "every bounded monotone sequence converges",
    "the rank of a matrix equals the rank of its transpose",
    "gcd(a, b) is a linear combination of a and b",
]
PROOF_FORMS = ["Prove that {}.", "Can you prove that {}?", "Prove rigorously that {}, step by step."]
CHATS = [
    "Suggest a name for a small bakery that sells sourdough.",
    "Write a short birthday message for my sister.",
    "What should I cook tonight with rice, eggs and spinach?",
    "Recommend three podcasts about history.",
    "Give me a packing list for a weekend of camping.",
    "Write a haiku about the sea at night.",
    "How do I politely decline a meeting invitation?",
    "Plan a one-day trip to Lisbon for a first-time visitor.",
    "What are some fun indoor games for kids?",
    "Write a thank-you note to a colleague who helped me move.",
    "Suggest a playlist for a rainy Sunday morning.",
    "How can I keep basil alive on a windowsill?",
    "Write a product description for a bamboo toothbrush.",
    "What is a good stretching routine after running?",
    "Give me ideas for a team lunch on a budget.",
    "Write a limerick about a forgetful cat.",
    "Recommend a few novels for someone who loved The Hobbit.",
    "How do I make cold brew coffee at home?",
    "Tell me a fun fact about octopuses.",
    "Write a short toast for a friend's wedding.",
    "What should I bring to a potluck dinner?",
    "Suggest names for a golden retriever puppy.",
    "How do I remove a coffee stain from a white shirt?",
    "Write a two-line poem about autumn leaves.",
    "Give me tips for a first job interview at a cafe.",
    "What are good houseplants for low light?",
    "Write a friendly reminder email about a book club meeting.",
    "Suggest a weekend breakfast menu for four people.",
    "How can I fall asleep faster?",
    "Describe a cozy reading nook in a few sentences.",
    "Recommend board games for two players.",
    "Write a cheerful good-morning text for my partner.",
    "What can I do on a rainy day in London?",
    "Give me three ideas for a science fair volcano display.",
    "Suggest a caption for a photo of my dog at the beach.",
    "How do I start journaling?",
    "Write a short welcome message for new members of a hiking club.",
    "What snacks are good for a road trip?",
    "Suggest a theme for a ten-year-old's birthday party.",
    "How do I clean a cast iron pan?",
    "Write a short bio for my pottery shop's website.",
    "Recommend some easy vegetarian dinners.",
    "What are fun things to do with grandparents?",
    "Write a get-well-soon card for a neighbour.",
]


def prompts_of(seed: int, n: int, pool_proofs: list[str], pool_chats: list[str]) -> list[str]:
    """n prompts, a share TARGET of them proofs, shuffled."""
    rng = random.Random(seed)
    proofs = [f.format(s) for s, f in itertools.product(pool_proofs, PROOF_FORMS)]
    k = round(n * TARGET)
    out = rng.sample(proofs, k) + rng.choices(pool_chats, k=n - k)
    rng.shuffle(out)
    return out


def cli(*args, env=None):
    return run_cli(*args, env={**PROVIDER_KEYS, **(env or {})}, ok=True).stdout


def test_traffic_label_train_calibrate_reload(tmp_path, mlflow_server):
    train_proofs, fresh_proofs = PROOFS[:16], PROOFS[16:]
    train_chats, fresh_chats = CHATS[:30], CHATS[30:]
    traffic = prompts_of(0, 100, train_proofs, train_chats)  # chat prompts repeat, as real traffic does
    fresh = prompts_of(1, 40, fresh_proofs, fresh_chats)
    with (
        FakeProvider(name="strong", model=STRONG_MODEL) as strong,
        FakeProvider(name="weak", model=WEAK_MODEL, fail_words=["prove"]) as weak,
        FakeProvider(name="judge", model="judge-model", judge=True) as judge,
    ):
        cfg = service_config(
            two_tiers(
                [provider_entry("weak", weak, "TEST_WEAK_A_KEY", WEAK_MODEL, (0.6, 0.6))],
                [provider_entry("strong", strong, "TEST_STRONG_A_KEY", STRONG_MODEL, (10, 30))],
            ),
            routing={"strong_fraction": TARGET},
            traffic={"store": str(tmp_path / "traffic.sqlite")},
            admin={"keys": [{"name": "ops", "sha256": hash_key(ADMIN_KEY)}]},
        )
        cfg["judge"] = {"provider": provider_entry("judge", judge, "TEST_STRONG_B_KEY", "judge-model", (1.0, 2.0))}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        with start_service(cfg) as service:
            # 1. real requests through the service, recorded; feedback on some of them
            client = openai.OpenAI(base_url=service.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
            ids = {}
            for text in traffic:
                raw = client.chat.completions.with_raw_response.create(
                    model="router", messages=[{"role": "user", "content": text}]
                )
                ids[raw.headers["x-request-id"]] = (text, raw.parse().choices[0].message.content)
            for rid, (text, answer) in list(ids.items())[:10]:
                r = httpx.post(
                    service.url + "/v1/feedback",
                    json={"request_id": rid, "thumbs": "down" if "cannot" in answer else "up"},
                    headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                    timeout=10,
                )
                assert r.status_code == 200, r.text
            service.app.state.service.traffic.close()  # flush the writer (the service records nothing more here)

            # 2. export -> label -> train -> calibrate, with the commands a user runs
            out = cli(
                "traffic", "export", "--store", tmp_path / "traffic.sqlite", "--out", tmp_path / "traffic.parquet"
            )
            assert out.startswith("100 requests (10 with feedback)"), out
            labelled = cli(
                "label",
                "--config",
                tmp_path / "config.yaml",
                "--prompts",
                tmp_path / "traffic.parquet",
                "--out",
                tmp_path / "graded.parquet",
                "--max-usd",
                "5",
                "--yes",
                "--quiet",
            )
            graded = pd.read_parquet(tmp_path / "graded.parquet")
            judged = graded[graded["source"] != "feedback"]
            assert (
                set(judged["model"]) == {WEAK_MODEL, STRONG_MODEL} and len(graded[graded["source"] == "feedback"]) == 10
            )
            proof = judged["prompt"].str.contains("prove", case=False)
            weak_rows = judged["model"] == WEAK_MODEL
            assert judged.loc[proof & weak_rows, "score"].max() < 0.5 < judged.loc[~proof | ~weak_rows, "score"].min()
            # two label runs' outputs (say two weeks of traffic), each with its judge and feedback sources: one train
            first = graded["prompt"].isin(graded["prompt"].drop_duplicates().iloc[::2])
            graded[first].to_parquet(tmp_path / "graded-1.parquet")
            graded[~first].to_parquet(tmp_path / "graded-2.parquet")
            trained = cli(
                "train",
                "--prior",
                ROUTER_DIR,
                "--data",
                tmp_path / "graded-1.parquet",
                "--data",
                tmp_path / "graded-2.parquet",
                "--out",
                tmp_path / "ours",
                "--quiet",
                env={"MLFLOW_TRACKING_URI": mlflow_server},
            )
            assert "top level over default@" in trained
            compared = cli(
                "eval",
                "--router",
                tmp_path / "ours",
                "--data",
                tmp_path / "graded-1.parquet",
                "--against",
                ROUTER_DIR,
                "--out",
                tmp_path / "eval",
                "--quiet",
                env={"MLFLOW_TRACKING_URI": mlflow_server},
            )
            calibrated = cli(
                "calibrate",
                "--router",
                tmp_path / "ours",
                "--prompts",
                tmp_path / "traffic.parquet",
                "--strong-fraction",
                str(TARGET),
                "--holdout",
                "0.3",
            )

            # 3. reload the service onto the new router and route fresh prompts of both kinds
            r = httpx.post(
                service.url + "/admin/reload",
                json={"path": str(tmp_path / "ours")},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            tiers = []
            for text in fresh:
                d = httpx.post(
                    service.url + "/v1/route",
                    json={"model": "router", "messages": [{"role": "user", "content": text}]},
                    headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                    timeout=10,
                ).json()
                assert d["router"] == r.json()["router"]
                tiers.append(d["tier"])
    wrong = {t: tier for t, tier in zip(fresh, tiers) if (tier == "strong") != ("prove" in t.lower())}
    share = tiers.count("strong") / len(tiers)
    report = (
        f"label: {labelled.strip().splitlines()[-1]}\ntrain: {trained}\neval: {compared}\n"
        f"calibrate: {calibrated}\nreload: {r.json()}\n"
        f"strong share asked {TARGET} achieved {share:.3f} on {len(fresh)} fresh prompts; misrouted {wrong}"
    )
    print(report)
    assert len(wrong) <= 2, report
    assert abs(share - TARGET) <= 0.05, report
