"""The command line as a user runs it, in process through typer's runner (tests/clirun.py): exit codes, one-line
errors, no tracebacks; the console script itself once, in a subprocess."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from clirun import cli
from conftest import STRONG, WEAK


def lines(out):
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_the_console_script_runs():
    from learned_router import __version__

    out = subprocess.run([sys.executable, "-m", "learned_router", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == f"learned-router {__version__}\n"


def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0
    for cmd in ("train", "export", "score"):
        assert cmd in out.stdout
    assert "--data" in cli("train", "--help").stdout


def test_every_option_has_help_and_flags_take_no_value_label():
    import typer

    from learned_router import __version__
    from learned_router.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            assert param.help, f"{name} {param.opts[0]} has no help text"
    out = cli("train", "--help", env={"COLUMNS": "200"})
    assert "--overwrite" in out.stdout and "--quiet" in out.stdout and "<bool>" not in out.stdout
    assert "<int>" in out.stdout  # options that take a value keep their type
    assert cli("--version").stdout == f"learned-router {__version__}\n"


@pytest.mark.slow
def test_bad_options_are_refused_before_any_data_is_read_or_run_started(tmp_path):
    out = cli(
        "train", "--data", tmp_path / "missing.parquet", "--variants", "int4", "--out", tmp_path / "o", cwd=tmp_path
    )
    assert out.returncode == 2 and "--variants: expected fp32, int8 or both" in out.stderr  # not the missing file
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no run, no folder


def test_score_from_arguments_file_and_stdin(trained, tmp_path):
    r = trained["path"]
    out = cli("score", "--router", r, "What is 2+2?", "Prove Fermat's last theorem for n=3")
    assert out.returncode == 0, out.stderr
    rows = lines(out)
    assert [x["id"] for x in rows] == [0, 1]
    for x in rows:
        assert 0 < x["p_weak"] <= 1 and x["threshold"] == trained["manifest"].default_threshold
        assert x["route"] == ("weak" if x["p_weak"] >= x["threshold"] else "strong")
        assert x["model"] == {"weak": WEAK, "strong": STRONG}[x["route"]] and 0 < x["difficulty"] < 1
    generic = lines(cli("score", "--router", r, "--weak", "generic", "--strong-fraction", "0.3", "hi"))[0]
    assert generic["threshold"] == pytest.approx(trained["manifest"].threshold_for(0.3, "generic"), abs=1e-6)
    assert generic["p_weak"] == pytest.approx(1 - generic["difficulty"], abs=1e-5)
    assert generic["model"] == {"weak": "generic", "strong": "strong"}[generic["route"]]

    pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["hello", "write a proof"]}).to_parquet(tmp_path / "p.parquet")
    assert [x["id"] for x in lines(cli("score", "--router", r, "--file", tmp_path / "p.parquet"))] == ["a", "b"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "bye"}\n')
    assert len(lines(cli("score", "--router", r, "--file", tmp_path / "p.jsonl"))) == 2

    everything = cli("score", "--router", r, "--threshold", "1.0", stdin="one\ntwo\n\nthree\n")
    assert [x["route"] for x in lines(everything)] == ["strong"] * 3


@pytest.mark.parametrize(
    "stdin, message",
    [
        (b"fine\n\xff\xfe broken\n", "stdin: line 2: not UTF-8 text (byte 0xff)"),
        (b"", "stdin: no prompts"),
        (b"\n  \n", "stdin: no prompts"),
    ],
)
def test_bad_stdin_is_one_line(trained, stdin, message):
    out = cli("score", "--router", trained["path"], stdin=stdin)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert isinstance(out.exception, SystemExit)


@pytest.mark.parametrize(
    "args, message",
    [
        (["score", "--router", "{r}", ""], "prompt 0: empty prompt"),
        (["score", "--router", "{r}", "--threshold", "1.5", "hi"], "threshold must be a number in [0, 1]"),
        (["score", "--router", "{tmp}/nope", "hi"], "router folder not found"),
        (["score", "--router", "{tmp}/" + "x" * 300, "hi"], "cannot be a router folder (File name too long)"),
        (["train", "--data", "{tmp}/" + "x" * 300, "--out", "{tmp}/o"], "x...: File name too long"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/o"], "a folder, not a file"),
        (["score", "--router", "{r}", "--file", "{tmp}"], "a folder, not a file"),
        (["calibrate", "--router", "{r}", "--prompts", "{tmp}/" + "x" * 300], "x...: File name too long"),
        (["score", "--router", "{r}", "--file", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
        (["score", "--router", "{r}", "--file", "{tmp}/noprompt.csv"], "no 'prompt' column"),
        (["score", "--router", "{r}", "--file", "{tmp}/latin1.txt"], "latin1.txt: line 1: not UTF-8 text"),
        (["score", "--router", "{r}/router.json", "hi"], "a file, not a router folder"),
        (["train", "--data", "{tmp}/empty.jsonl", "--out", "{tmp}/o"], "empty.jsonl"),
        (["train", "--data", "{tmp}/missing.parquet", "--out", "{tmp}/o"], "missing.parquet: no such file"),
        (["train", "--data", "{tmp}/noprompt.csv", "--out", "{tmp}/o"], "unrecognised columns"),
        (["score", "--router", "{r}", "--weak", "gpt-5", "hi"], "not trained on 'gpt-5'"),
        (["score", "--router", "{r}", "--threshold", "0.5", "--strong-fraction", "0.3", "hi"], "not both"),
        (
            ["train", "--data", "{data}/routellm_gsm8k.parquet", "--weak", "mixtral", "--out", "{tmp}/o"],
            "--weak 'mixtral' is graded in none of the --data files",
        ),
        (
            ["train", "--data", "{data}/routellm_gsm8k.parquet", "--weight", "oops", "--out", "{tmp}/o"],
            "--weight expects SOURCE=NUMBER",
        ),
        (
            ["train", "--data", "{data}/routellm_gsm8k.parquet", "--steps", "0", "--out", "{tmp}/o"],
            "--steps must be at least 1",
        ),
        (
            ["train", "--data", "{data}/routellm_gsm8k.parquet", "--variants", "int4", "--out", "{tmp}/o"],
            "--variants: expected fp32",
        ),
        (["export", "--router", "{tmp}"], "checkpoint/training.json: missing"),
    ],
)
def test_bad_input_gives_one_clear_line(trained, tmp_path, datasets_dir, args, message):
    (tmp_path / "noprompt.csv").write_text("question,answer\nq,a\n")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (tmp_path / "empty.jsonl").write_text("")
    args = [a.format(r=trained["path"], tmp=tmp_path, data=datasets_dir) for a in args]
    out = cli(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr and isinstance(out.exception, SystemExit)
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_missing_module_is_named_with_the_extra_that_installs_it():
    from learned_router.cli.common import missing_module

    assert missing_module("torch").startswith(
        "torch is not installed: this command needs pip install 'learned-router[train]'"
    )
    assert missing_module("sklearn.metrics").endswith(
        "'learned-router[train]' (torch==2.13.0 first: an unpinned torch pulls CUDA)"
    )
    assert (
        missing_module("uvicorn") == "uvicorn is not installed: this command needs pip install 'learned-router[serve]'"
    )
    assert missing_module("not_a_dependency") == "not_a_dependency is not installed"  # not "install the train extra"


def test_compare_says_same_router_or_what_differs(trained, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained["path"], copy)
    record = json.loads((copy / "router.json").read_text())
    record["created_at"], record["versions"] = "2030-01-01T00:00:00+00:00", {}  # what retraining elsewhere changes
    record["default_threshold"] += 0.001
    (copy / "router.json").write_text(json.dumps(record))
    same = cli("compare", trained["path"], copy)
    assert same.returncode == 0 and same.stdout.startswith("same router:"), same.stdout + same.stderr
    record["default_threshold"] += 0.05
    record["calibration"]["thresholds"]["generic"] = [t + 0.01 for t in record["calibration"]["thresholds"]["generic"]]
    (copy / "router.json").write_text(json.dumps(record))
    differs = cli("compare", trained["path"], copy)
    assert (
        differs.returncode == 1
        and "default threshold:" in differs.stdout
        and "calibration of generic" in differs.stdout
    )


@pytest.mark.slow
def test_a_small_table_of_ones_own_trains_with_warnings_that_say_what_to_do(tmp_path, datasets_dir):
    import pandas as pd

    df = pd.read_parquet(datasets_dir / "routellm_gsm8k.parquet")
    prompts = df["prompt"].drop_duplicates().head(60)
    mine = df[df["prompt"].isin(set(prompts))][["prompt", "model", "score"]]
    mine["model"] = mine["model"].map(
        {"gpt-4-1106-preview": "my-big", "mistralai/Mixtral-8x7B-Instruct-v0.1": "my-small"}
    )
    mine.dropna().to_csv(tmp_path / "mine.csv", index=False)
    r = cli(
        "train",
        "--data",
        tmp_path / "mine.csv",
        "--strong",
        "my-big",
        "--weak",
        "my-small",
        "--steps",
        "20",
        "--variants",
        "fp32",
        "--out",
        tmp_path / "r",
        "--quiet",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "only 60 prompts" in r.stderr and "train --prior models/default" in r.stderr
    assert "test prompts: the test AUCs are noise" in r.stderr
    assert "--reference arena_bench_v1 is not among the data's sources (mine)" in r.stderr
    assert "no --calibration source is in the data" in r.stderr


def test_eval_with_a_pair_the_data_does_not_grade_starts_no_mlflow_run(trained, tmp_path, datasets_dir):
    r = cli(
        "eval",
        "--router",
        trained["path"],
        "--data",
        datasets_dir / "routellm_gsm8k.parquet",
        "--weak",
        "mixtral",
        "--out",
        tmp_path / "o",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "model(s) mixtral not graded there" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "o").exists()  # no FAILED run left behind
