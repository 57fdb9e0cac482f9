"""`learned-router label`: real fake providers (a weak model that fails on some words, a strong one, a judge) over
HTTP, the graded table `train` reads, resuming, the budget stop, unparseable verdicts, feedback, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from learned_router.cli import app
from learned_router.errors import DataError
from learned_router.judge import pairwise_grade, pairwise_messages, parse_rating, parse_verdict, single_messages
from learned_router.label import plan
from learned_router.serving.config import load_config, parse_config
from learned_router.tools.fake_provider import GARBAGE, fails, judge_answer
from serving_fixtures import ROOT, judged_fakes, wait_for

runner = CliRunner()
N = 20
POISON = [i for i in range(N) if i % 4 == 1]  # prompts holding the weak model's fail word
LOW, HIGH = 1 / 9, 8 / 9  # Rating [[2]] and [[9]]
COLUMNS = ["prompt", "prompt_id", "model", "score", "source", "judge", "baseline", "raw", "client"]


@pytest.fixture(scope="module")
def fakes():
    with judged_fakes(["poison"]) as fakes:
        yield fakes


@pytest.fixture(autouse=True)
def healed(fakes):
    yield
    for f in fakes:
        f.heal()


def config(fakes, mode: str = "single", **judge) -> dict:
    weak, strong, jf = fakes
    return {
        "tiers": [
            {
                "name": "weak",
                "score": "weak-model",
                "providers": [
                    {
                        "name": "weak-a",
                        "base_url": weak.base_url,
                        "model": "weak-model",
                        "input_price_per_1m": 1,
                        "output_price_per_1m": 2,
                    }
                ],
            },
            {
                "name": "strong",
                "providers": [
                    {
                        "name": "strong-a",
                        "base_url": strong.base_url,
                        "model": "strong-model",
                        "input_price_per_1m": 10,
                        "output_price_per_1m": 30,
                    }
                ],
            },
        ],
        "auth": {"enabled": False},
        "retry": {"attempts": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.02},
        "circuit_breaker": {"failures": 1000, "cooldown_s": 1},
        "judge": {
            "provider": {
                "name": "judge",
                "base_url": jf.base_url,
                "model": "judge-model",
                "input_price_per_1m": 5,
                "output_price_per_1m": 15,
            },
            "mode": mode,
            "max_tokens": 16,
            "answer_max_tokens": 24,
            **judge,
        },
    }


def files(tmp_path, cfg: dict, prompts: pd.DataFrame | None = None, name: str = "graded.parquet"):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    if prompts is None:
        prompts = pd.DataFrame(
            {
                "prompt": [
                    f"Question {i}: explain the poison pill defence."
                    if i in POISON
                    else f"Question {i}: explain topic number {i}."
                    for i in range(N)
                ]
            }
        )
    prompts.to_parquet(tmp_path / "prompts.parquet")
    return tmp_path / "config.yaml", tmp_path / "prompts.parquet", tmp_path / name


def label(cfg_path, prompts, out, *extra) -> tuple[int, str]:
    result = runner.invoke(
        app,
        [
            "label",
            "--config",
            str(cfg_path),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--yes",
            "--quiet",
            *map(str, extra),
        ],
    )
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def figure(output: str, name: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith(name))
    return line.split(":", 1)[1].split()[0].rstrip(";,")


def test_the_rubric_parses_verdicts_and_never_guesses():
    assert parse_rating("Fine. Rating: [[9]]") == pytest.approx(HIGH) and parse_rating("Rating: [[1]]") == 0.0
    assert (
        parse_rating("Rating: [[7.5]]") == pytest.approx(6.5 / 9) and parse_rating("[[10]] ... Rating: [[10]]") == 1.0
    )
    for text in ("Rating: 9", "Rating: [[11]]", "Rating: [[0]]", "[[3]] or maybe [[4]]", "", "Rating: [[rating]]"):
        assert parse_rating(text) is None, text
    assert parse_verdict("so [[A]]") == "A" and parse_verdict("[[C]]") == "C"
    assert parse_verdict("[[A]] no, [[B]]") is None and parse_verdict("A is better") is None
    assert [pairwise_grade(a, b) for a, b in (("A", "B"), ("A", "C"), ("C", "C"), ("B", "A"), ("A", "A"))] == [
        1,
        0.75,
        0.5,
        0,
        0.5,
    ]
    # the fake judge reads the answers back out of the real prompts
    assert judge_answer(single_messages("q?", "I cannot answer that.", "ref")[1]["content"]).endswith("[[2]]")
    assert judge_answer(single_messages("q?", "[strong] Fine.")[1]["content"]).endswith("[[9]]")
    assert judge_answer(pairwise_messages("q?", "I cannot answer that.", "ok")[1]["content"]).endswith("[[B]]")
    assert judge_answer(pairwise_messages("q?", "ok", "I cannot answer that.")[1]["content"]).endswith("[[A]]")
    assert judge_answer(pairwise_messages("q?", "ok", "fine")[1]["content"]).endswith("[[C]]")
    assert judge_answer("what?") == GARBAGE and parse_rating(GARBAGE) is None and parse_verdict(GARBAGE) is None
    assert fails("Explain the POISON pill", ["poison"]) and not fails("poisonous", ["poison"])


def test_single_mode_grades_each_answer_and_a_rerun_skips_everything(fakes, tmp_path):
    cfg_path, prompts, out = files(tmp_path, config(fakes))
    code, output = label(cfg_path, prompts, out)
    assert code == 0, output
    assert "estimated $" in output.splitlines()[1] and figure(output, "rows written") == "40"
    assert figure(output, "failures") == "0" and figure(output, "unparseable judge answers") == "0"
    df = pd.read_parquet(out)
    assert list(df.columns) == COLUMNS and len(df) == 2 * N
    assert set(df.groupby("prompt_id")["model"].apply(lambda m: tuple(sorted(m)))) == {("strong-model", "weak-model")}
    assert set(df["source"]) == {"judge_single"} and set(df["judge"]) == {"judge-model"} and df["baseline"].isna().all()
    poison = df["prompt"].str.contains("poison")
    weak = df["model"] == "weak-model"
    assert df.loc[weak & poison, "score"].tolist() == pytest.approx([LOW] * len(POISON))
    assert (df.loc[weak & poison, "raw"] == "2").all() and set(df.loc[~(weak & poison), "raw"]) == {"9"}
    assert df.loc[~(weak & poison), "score"].tolist() == pytest.approx([HIGH] * (2 * N - len(POISON)))
    assert poison[weak].sum() == len(POISON)
    # the judge saw the strongest answer as the reference for the weak model, and no reference for the strongest
    judged = fakes[2].stats()["prompts"][-2 * N :]
    assert sum("[The Start of Reference Answer]" in p for p in judged) == N
    # the table is what training reads: an absolute source
    from learned_router.data import load_sources, observations

    (src,) = load_sources(out)
    assert src.scheme == "absolute" and len(observations(src)) == 2 * N

    before = [f.stats()["requests"] for f in fakes]
    code, output = label(cfg_path, prompts, out)
    assert (
        code == 0 and figure(output, "rows written") == "0" and figure(output, "rows skipped (already graded)") == "40"
    )
    assert [f.stats()["requests"] for f in fakes] == before  # not one call
    pd.testing.assert_frame_equal(pd.read_parquet(out), df)


def test_a_run_stopped_at_the_budget_then_resumed_ends_as_one_uninterrupted_run(fakes, tmp_path):
    (tmp_path / "whole").mkdir()
    (tmp_path / "parts").mkdir()
    cfg_path, prompts, whole = files(tmp_path / "whole", config(fakes))
    assert label(cfg_path, prompts, whole)[0] == 0
    cfg_path, prompts, out = files(tmp_path / "parts", config(fakes))
    estimate = plan(parse_config(config(fakes)), prompts, out).estimate_usd
    code, output = label(cfg_path, prompts, out, "--max-usd", f"{estimate / 2:.8f}")
    assert code == 0, output
    assert "stopped at the budget" in output and "rerun the same command" in output
    spent = float(figure(output, "spent").lstrip("$"))
    assert 0 < spent <= estimate / 2
    first = len(pd.read_parquet(out))
    assert 0 < first < 2 * N
    code, output = label(cfg_path, prompts, out)
    assert code == 0 and "stopped at the budget" not in output
    assert (
        int(figure(output, "rows written")) == 2 * N - first
        and int(figure(output, "rows skipped (already graded)")) == first
    )
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(whole))
    # a budget too small for any call: nothing is sent, and it says so
    cfg_path, prompts, out = files(tmp_path, config(fakes), name="none.parquet")
    code, output = label(cfg_path, prompts, out, "--max-usd", "0")
    assert code == 0 and "stopped at the budget" in output and figure(output, "rows written") == "0"


def test_pairwise_mode_writes_versus_rows_and_feedback_joins_as_its_own_source(fakes, tmp_path):
    prompts = pd.DataFrame(
        {
            "prompt_id": [f"req-{i}" for i in range(N)],
            "prompt": [
                f"Question {i}: the poison pill?" if i in POISON else f"Question {i}: explain {i}." for i in range(N)
            ],
            "tier": ["weak" if i % 2 else "strong" for i in range(N)],
            "feedback": [None if i % 3 == 0 else (0.0 if i % 2 else 1.0) for i in range(N)],
        }
    )
    prompts.loc[19, "tier"] = "retired"  # a tier no longer in the config: its feedback is counted and skipped
    cfg_path, path, out = files(tmp_path, config(fakes, mode="pairwise"), prompts)
    code, output = label(cfg_path, path, out, "--concurrency", 3)
    assert code == 0, output
    assert "1 of tier 'retired' skipped" in output
    df = pd.read_parquet(out)
    judged, fb = df[df["source"] == "judge_pairwise"], df[df["source"] == "feedback"]
    assert len(judged) == N and set(judged["model"]) == {"weak-model"} and set(judged["baseline"]) == {"strong-model"}
    poison = judged["prompt"].str.contains("poison")
    assert (judged.loc[poison, "score"] == 0).all() and set(judged.loc[poison, "raw"]) == {"B/A"}  # lost in both orders
    assert (judged.loc[~poison, "score"] == 0.5).all() and set(judged.loc[~poison, "raw"]) == {"C/C"}
    expected = prompts[prompts["feedback"].notna() & (prompts["tier"] != "retired")]
    assert len(fb) == len(expected) and fb["judge"].isna().all() and fb["baseline"].isna().all()
    assert dict(zip(fb["prompt_id"], fb["model"])) == {
        pid: "weak-model" if t == "weak" else "strong-model" for pid, t in zip(expected["prompt_id"], expected["tier"])
    }
    assert dict(zip(fb["prompt_id"], fb["score"])) == dict(zip(expected["prompt_id"], expected["feedback"]))
    assert figure(output, "rows written") == str(N + len(expected))
    # training reads the file as two sources: the judge's preferences versus the baseline, and absolute feedback
    from learned_router.data import load_sources, observations

    sources = {s.name: s for s in load_sources(out)}
    assert {k: s.scheme for k, s in sources.items()} == {"judge_pairwise": "versus", "feedback": "absolute"}
    versus = observations(sources["judge_pairwise"])
    assert set(versus["opponent"]) == {"strong-model"} and len(versus) == N
    # a rerun adds nothing, feedback included
    code, output = label(cfg_path, path, out)
    assert figure(output, "rows written") == "0" and len(pd.read_parquet(out)) == len(df)


def test_unparseable_verdicts_are_counted_never_guessed_and_retried_by_a_rerun(fakes, tmp_path):
    cfg_path, prompts, out = files(tmp_path, config(fakes))
    fakes[2].control(judge_garbage_rate=1.0)
    code, output = label(cfg_path, prompts, out)
    assert code == 0, output
    assert figure(output, "unparseable judge answers") == "40" and "40 rows not written" in output
    assert figure(output, "rows written") == "0" and len(pd.read_parquet(out)) == 0
    fakes[2].control(judge_garbage_rate=0.0)
    answered = [f.stats()["requests"] for f in fakes[:2]]
    code, output = label(cfg_path, prompts, out)
    assert figure(output, "rows written") == "40" and figure(output, "unparseable judge answers") == "0"
    assert [f.stats()["requests"] for f in fakes[:2]] == answered  # the answers came from the journal


def test_failed_providers_are_counted_and_a_rerun_fills_the_gaps(fakes, tmp_path):
    cfg_path, prompts, out = files(tmp_path, config(fakes))
    fakes[0].control(mode="error")
    code, output = label(cfg_path, prompts, out, "--sample", 10, "--seed", 3)
    assert code == 0, output
    assert figure(output, "failures (provider failed)") == "10" and "weak/weak-a: HTTP 503" in output
    df = pd.read_parquet(out)
    assert set(df["model"]) == {"strong-model"} and len(df) == 10
    fakes[0].heal()
    code, output = label(cfg_path, prompts, out, "--sample", 10, "--seed", 3)  # the same sample
    assert figure(output, "rows written") == "10" and figure(output, "rows skipped (already graded)") == "10"
    df = pd.read_parquet(out)
    assert len(df) == 20 and df.groupby("prompt_id").size().eq(2).all()


def test_bad_input_is_one_line_and_exit_2(fakes, tmp_path):
    def error(
        args: list, cfg: dict | None = None, prompts: pd.DataFrame | None = None, raw: bytes | None = None
    ) -> str:
        cfg_path, path, out = files(tmp_path, cfg or config(fakes), prompts)
        if raw is not None:
            path = tmp_path / "prompts.csv"
            path.write_bytes(raw)
        result = runner.invoke(
            app, ["label", "--config", str(cfg_path), "--prompts", str(path), "--out", str(out), *map(str, args)]
        )
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
        return lines[0]

    no_judge = config(fakes)
    del no_judge["judge"]
    assert error(["--yes"], no_judge).startswith("error: judge: the config has no judge block")
    assert "unknown name 'medium'; tiers: weak, strong; providers: weak-a, strong-a" in error(
        ["--models", "weak,medium", "--yes"]
    )
    assert "no 'prompt' column (columns: text)" in error(["--yes"], prompts=pd.DataFrame({"text": ["hi"]}))
    assert "prompts.csv: line 2: not UTF-8 text" in error(["--yes"], raw=b"prompt\n\xff\xfe\n")
    assert "row 1: field 'feedback' must be a number in [0, 1]" in error(
        ["--yes"], prompts=pd.DataFrame({"prompt": ["a", "b"], "tier": ["weak", "weak"], "feedback": [1.0, 2.0]})
    )
    assert "pairwise mode compares each model" in error(["--models", "weak", "--yes"], config(fakes, mode="pairwise"))
    missing = files(tmp_path, config(fakes))[0]
    result = runner.invoke(
        app,
        [
            "label",
            "--config",
            str(missing),
            "--prompts",
            str(tmp_path / "nope.parquet"),
            "--out",
            str(tmp_path / "o.parquet"),
            "--yes",
        ],
    )
    assert result.exit_code == 2 and result.output.strip() == f"error: {tmp_path / 'nope.parquet'}: no such file"
    keyed = config(fakes)
    keyed["judge"]["provider"]["api_key_env"] = "LABEL_TEST_UNSET_KEY"
    assert "judge.provider.api_key_env: environment variable LABEL_TEST_UNSET_KEY is not set" in error(["--yes"], keyed)
    same = config(fakes)
    same["judge"]["provider"]["name"] = "strong-a"
    assert "judge.provider.name: 'strong-a' is also a tier's provider" in error(["--yes"], same)
    # a row of a data class goes only where the service's data rules let it: here the judge is not allowed
    classed = config(fakes)
    classed["data_classes"] = {"restricted": ["weak-a", "strong-a"], "open": ["weak-a", "strong-a", "judge"]}
    rows = pd.DataFrame({"prompt": ["a", "b", "c"], "data_class": [None, "open", "restricted"]})
    calls = [f.stats()["requests"] for f in fakes]
    assert "row 2: data class 'restricted' may not reach judge (data_classes.restricted: weak-a, strong-a)" in error(
        ["--yes"], classed, rows
    )
    assert "row 1: field 'data_class' is not a class of the config's data_classes (none configured)" in error(
        ["--yes"], prompts=rows
    )
    assert [f.stats()["requests"] for f in fakes] == calls  # refused before any call
    # without --yes and without a terminal to ask on, nothing is sent
    files(tmp_path, config(fakes))
    result = runner.invoke(
        app,
        [
            "label",
            "--config",
            str(missing),
            "--prompts",
            str(tmp_path / "prompts.parquet"),
            "--out",
            str(tmp_path / "o.parquet"),
        ],
    )
    assert result.exit_code == 2 and result.output.splitlines()[-1].startswith("error: --yes:")
    assert not (tmp_path / "o.parquet").exists()


def test_ctrl_c_keeps_every_graded_row_and_a_rerun_finishes_the_table(fakes, tmp_path):
    """A real process, interrupted with SIGINT mid-run: the table is written, exit 130, the rerun completes it."""
    (tmp_path / "whole").mkdir()
    cfg_path, prompts, whole = files(tmp_path / "whole", config(fakes))
    assert label(cfg_path, prompts, whole)[0] == 0
    cfg_path, prompts, out = files(tmp_path, config(fakes, concurrency=2))
    fakes[2].control(latency_ms=150)
    journal = tmp_path / "graded.parquet.journal.jsonl"
    env = {**os.environ, "CI": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "learned_router",
            "label",
            "--config",
            str(cfg_path),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--yes",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # a shell's background job ignores it
    try:
        wait_for(lambda: journal.is_file() and journal.read_text().count('"kind": "row"') >= 3, timeout=60)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted: the rows graded so far are in" in output and "Traceback" not in output
    rows = [json.loads(line) for line in journal.read_text().splitlines() if '"kind": "row"' in line]
    first = pd.read_parquet(out)
    assert 3 <= len(first) == len(rows) < 2 * N
    fakes[2].control(latency_ms=0)
    code, output = label(cfg_path, prompts, out)
    assert code == 0 and int(figure(output, "rows skipped (already graded)")) == len(first)
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(whole))


def test_the_example_config_has_a_judge_block():
    judge = load_config(ROOT / "serving" / "config.example.yaml").judge
    assert judge.provider.base_url == "http://127.0.0.1:9004/v1" and judge.mode == "single"


def test_labelling_never_imports_torch_nor_the_server_nor_redis():
    code = (
        "import sys, learned_router.label, learned_router.serving.providers; "
        "bad = [m for m in ('torch', 'sentence_transformers', 'transformers', 'datasets', 'redis', 'uvicorn', "
        "'fastapi') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_read_prompts_names_the_first_bad_row(tmp_path):
    from learned_router.label import read_prompts

    def bad(df: pd.DataFrame) -> str:
        path = tmp_path / "p.jsonl"
        df.to_json(path, orient="records", lines=True)
        with pytest.raises(DataError) as e:
            read_prompts(path)
        return str(e.value).removeprefix(f"{path}: ")

    assert bad(pd.DataFrame({"prompt": ["a", " ", ""]})) == "row 1: field 'prompt' is empty or not text (got ' ')"
    assert (
        bad(pd.DataFrame({"prompt": ["a", "b", "c"], "prompt_id": ["1", "2", "1"]}))
        == "row 2: field 'prompt_id' '1' names another prompt than row 0's"
    )
    assert (
        bad(pd.DataFrame({"prompt": ["a", "b"], "tier": ["weak", "weak"], "feedback": [None, True]}))
        == "row 1: field 'feedback' must be a number in [0, 1] or null (got True)"
    )
    path = tmp_path / "ok.jsonl"
    pd.DataFrame({"prompt": ["a", "b", "a"], "prompt_id": ["1", "2", "1"]}).to_json(path, orient="records", lines=True)
    assert read_prompts(path)["prompt_id"].tolist() == ["1", "2", "1"]


def test_one_clients_flood_of_feedback_can_be_capped_or_dropped_and_never_reaches_training(fakes, tmp_path):
    honest = pd.DataFrame(
        {
            "prompt_id": [f"req-{i}" for i in range(N)],
            "prompt": [f"Question {i}: explain {i}." for i in range(N)],
            "tier": ["weak"] * N,
            "feedback": [1.0] * N,
            "client": ["alice" if i % 2 else "bob" for i in range(N)],
        }
    )
    flood = pd.DataFrame(
        {
            "prompt_id": [f"bad-{i}" for i in range(200)],
            "prompt": [f"Question {i % N}: explain {i % N}." for i in range(200)],
            "tier": ["weak"] * 200,
            "feedback": [0.0] * 200,
            "client": ["mallory"] * 200,
        }
    )
    flood["prompt_id"] = [f"req-{i % N}" for i in range(200)]  # the same requests, graded again and again
    cfg = config(fakes)
    outs = {}
    for name, prompts, extra in [
        ("honest", honest, []),
        ("dropped", pd.concat([honest, flood]), ["--exclude-client", "mallory"]),
        ("capped", pd.concat([honest, flood]), ["--max-feedback-share", "0.5"]),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        cfg_path, path, out = files(folder, cfg, prompts)
        code, output = label(cfg_path, path, out, *extra)
        assert code == 0, output
        outs[name] = (pd.read_parquet(out), output)
    fb = {k: df[df["source"] == "feedback"] for k, (df, _) in outs.items()}
    assert set(fb["honest"]["client"]) == {"alice", "bob"} and fb["honest"]["client"].notna().all()  # who gave it
    assert "feedback per client (kept of given): mallory 0 of 200, alice 10 of 10, bob 10 of 10" in outs["dropped"][1]
    assert (
        fb["dropped"]
        .drop(columns="raw")
        .reset_index(drop=True)
        .equals(fb["honest"].drop(columns="raw").reset_index(drop=True))
    )
    kept = fb["capped"]["client"].value_counts()
    assert kept["mallory"] == 20 and kept["alice"] == kept["bob"] == 10  # half of the feedback at most, not 200 of 220
    assert "mallory 20 of 200" in outs["capped"][1]
    # the flood never reaches training: the same graded rows train the same router
    from learned_router.data import load_grades

    a, b = (load_grades([tmp_path / k / "graded.parquet"], val=0.0, test=0.0).obs for k in ("honest", "dropped"))
    cols = ["prompt", "model", "source", "grade"]
    assert a[cols].sort_values(cols).reset_index(drop=True).equals(b[cols].sort_values(cols).reset_index(drop=True))
    bad = label(*files(tmp_path / "honest", cfg, honest)[:2], tmp_path / "x.parquet", "--max-feedback-share", "0")
    assert bad[0] == 2 and "--max-feedback-share: expected a share in (0, 1]" in bad[1]
