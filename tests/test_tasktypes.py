"""Task types: the labelled table, the types file, the inferred types' precision, and routers without embeddings."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from learned_router import Router, RouterError
from learned_router.cli import app
from learned_router.manifest import RouterFolder
from learned_router.tasktypes import TaskTypeError, evaluate, load_types, read_table, types_path
from serving_fixtures import ROOT, ROUTER_DIR

TABLE = ROOT / "tests" / "data" / "task_types.csv"
# Measured on models/default (int8) with the package's types file: macro precision 0.870, the lowest type's precision
# 0.640 (extraction, against summarisation). The floors leave room for float noise between machines, not for a
# regression.
MACRO_PRECISION_FLOOR, TYPE_PRECISION_FLOOR = 0.85, 0.6

needs_router = pytest.mark.skipif(
    not (ROUTER_DIR / "router.json").is_file(), reason=f"no trained router at {ROUTER_DIR}"
)


@pytest.fixture(scope="module")
def router() -> Router:
    r = Router(ROUTER_DIR, threads=1)
    assert r.has_embedding, f"{ROUTER_DIR} has no embedding output: re-export it (learned-router export)"
    return r


def test_the_labelled_table_covers_every_type_from_several_sources_and_shares_no_prompt_with_the_examples():
    types = load_types(types_path())
    with TABLE.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["type"] for r in rows} == set(types)
    for name in types:
        mine = [r for r in rows if r["type"] == name]
        assert len(mine) >= 20, name
        assert len({r["source"] for r in mine}) >= 2, name
    assert len({r["source"] for r in rows if r["source"] != "hand-written"}) >= 6
    examples = {e.strip().lower() for t in types.values() for e in t.examples}
    assert not examples & {r["prompt"].strip().lower() for r in rows}
    assert len({r["prompt"] for r in rows}) == len(rows)


@needs_router
def test_task_types_command_prints_precision_that_meets_the_floor():
    out = CliRunner().invoke(app, ["task-types", "--router", str(ROUTER_DIR), "--table", str(TABLE), "--threads", "1"])
    assert out.exit_code == 0, out.output
    printed = {
        line.split()[0]: [float(x) for x in line.split()[1:3]]
        for line in out.output.splitlines()[1:]
        if line and not line.startswith("(")
    }
    types = load_types(types_path())
    assert set(printed) == set(types) | {"macro"}
    assert printed["macro"][0] >= MACRO_PRECISION_FLOOR, printed
    assert all(printed[t][0] >= TYPE_PRECISION_FLOOR for t in types), printed


@needs_router
def test_types_follow_the_examples_and_a_new_type_needs_only_examples(router, tmp_path):
    from learned_router.tasktypes import TaskClassifier

    types = load_types(types_path())
    clf = TaskClassifier.build(types, router.embed)
    assert clf.types_of(router.embed(["Translate 'see you tomorrow' into German.", "hello, how are you?"])) == [
        "translation",
        "chitchat",
    ]
    recipes = "\n".join(
        f"      - {t}"
        for t in [
            "Give me a recipe for banana bread.",
            "How long do I boil an egg for a soft yolk?",
            "What can I cook with chickpeas, spinach and rice?",
            "How do I make a vinaigrette?",
        ]
    )
    path = tmp_path / "types.yaml"
    path.write_text(
        types_path().read_text() + f"  cooking:\n    description: recipes and cooking\n    examples:\n{recipes}\n"
    )
    clf = TaskClassifier.build(load_types(path), router.embed)
    assert clf.types_of(router.embed(["What's a good recipe for lentil soup?"])) == ["cooking"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("types: {code: {description: c, examples: [a, b, c]}}", "types: .*at least 2"),
        (
            "types: {code: {description: c, examples: [a, b]}, math: {description: m, examples: [a, b, c]}}",
            "types.code.examples",
        ),
        (
            "types: {Code!: {description: c, examples: [a, b, c]}, math: {description: m, examples: [a, b, c]}}",
            "'Code!'",
        ),
        (
            "types: {unknown: {description: c, examples: [a, b, c]}, math: {description: m, examples: [a, b, c]}}",
            "'unknown'",
        ),
        ("types: [", "not valid YAML"),
    ],
)
def test_a_bad_types_file_is_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(TaskTypeError, match=message):
        load_types(path)


def test_evaluate_and_the_table_reader(tmp_path):
    m = evaluate(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b", "c"])
    assert m["a"] == {"precision": 0.5, "recall": 1.0, "support": 1.0}
    assert m["b"]["precision"] == 1.0 and m["b"]["recall"] == pytest.approx(2 / 3) and m["c"]["precision"] == 0.0
    bad = tmp_path / "t.csv"
    bad.write_text("label,prompt\nx,y\n")
    with pytest.raises(TaskTypeError, match="missing: type"):
        read_table(bad)


def test_a_router_folder_can_carry_its_own_types_file(tmp_path):
    assert types_path(tmp_path) == types_path()  # none there: the package's
    (tmp_path / "task_types.yaml").write_text("x")
    assert types_path(tmp_path) == tmp_path / "task_types.yaml"
    assert types_path(tmp_path, tmp_path / "mine.yaml") == tmp_path / "mine.yaml"


@needs_router
def test_embeddings_come_with_the_scores_and_an_older_graph_without_them_still_scores(router, tmp_path):
    import onnx

    prompts = ["Write a haiku about rain.", "What is 17 * 23?"]
    out = router.predict(prompts)
    scores, emb = out.pass_chances(), out.embedding
    assert np.array_equal(scores, router.score(prompts))
    assert emb.shape == (2, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
    # a router exported before the graph had its embedding output
    old = tmp_path / "old"
    shutil.copytree(ROUTER_DIR, old, ignore=shutil.ignore_patterns("checkpoint", "task_types.yaml"))
    folder = RouterFolder(old)
    manifest = folder.manifest()
    graph = onnx.load(str(old / manifest.files[router.variant].path))
    kept = [o for o in graph.graph.output if o.name != "embedding"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, str(old / manifest.files[router.variant].path))
    manifest.files[router.variant] = folder.entry(manifest.files[router.variant].path)
    folder.write_manifest(manifest)
    legacy = Router(old, threads=1)
    assert not legacy.has_embedding
    assert np.array_equal(legacy.score(prompts), scores)
    with pytest.raises(RouterError, match="no embedding output; re-export it"):
        legacy.embed(prompts)
    out = CliRunner().invoke(app, ["task-types", "--router", str(old), "hello"])
    assert out.exit_code == 2 and "re-export it" in out.output and "Traceback" not in out.output
