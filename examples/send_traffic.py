"""Send prompts through the routing service as chat requests, as an application would: the demo's traffic.

    python examples/send_traffic.py --prompts ../shared/datasets/arena_battles_1k.parquet --sample 300

Prints one JSON line per request (its x-request-id, tier and the answer's first words), then the share of each tier.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", required=True, help="parquet or JSONL with a 'prompt' column")
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the service's OpenAI-compatible base URL")
    ap.add_argument("--key", default="sk-router-demo", help="a client key of the service")
    ap.add_argument("--sample", type=int, default=None, help="send this many prompts, sampled at random (seed 0)")
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    df = pd.read_json(args.prompts, lines=True) if args.prompts.endswith(".jsonl") else pd.read_parquet(args.prompts)
    prompts = df["prompt"].drop_duplicates()
    prompts = prompts.sample(n=min(args.sample, len(prompts)), random_state=0) if args.sample else prompts
    tiers: Counter = Counter()
    with httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.key}"}, timeout=120) as client:
        def send(prompt: str) -> dict:
            while True:
                r = client.post("/chat/completions", json={"model": "router", "messages": [{"role": "user", "content": prompt}]})
                if r.status_code != 429:
                    break
                time.sleep(float(r.headers.get("retry-after", 1)))  # the key's rate limit: wait as told
            answer = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.json()["error"]["message"]
            return {"request_id": r.headers.get("x-request-id"), "status": r.status_code, "tier": r.headers.get("x-router-tier"),
                    "answer": answer[:60]}

        with ThreadPoolExecutor(args.concurrency) as pool:
            for line in pool.map(send, prompts.tolist()):
                tiers[line["tier"]] += 1
                print(json.dumps(line))
    total = sum(tiers.values())
    print(", ".join(f"{tier}: {n / total:.1%}" for tier, n in tiers.most_common()))


if __name__ == "__main__":
    main()
