"""A training run logged to a real `mlflow server`, read back through MLflow's client."""

from mlflow.tracking import MlflowClient

from learned_router.parity import GATES


def test_run_is_in_the_tracking_server(trained):
    client = MlflowClient(tracking_uri=trained["url"])
    run = client.get_run(trained["run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["strong"] == "gpt-4-1106-preview" and len(p["data_routellm_gsm8k_sha256"]) == 16
    assert (p["encoder_layers"], p["factors"], p["steps"], p["max_prompts"]) == ("3", "8", "150", "80")  # the recipe
    assert p["reference"] == "arena_bench_v1"
    m = run.data.metrics
    assert m["test_auc_arena_bench_v1"] == trained["manifest"].metrics["test_auc_arena_bench_v1"]
    assert (
        0 <= float(p["parity_int8_mean_abs_diff"]) < GATES["int8"]["mean_abs_diff"]
        and "parity_int8_strong_share_shift" in p
    )
    auc = {k for k in trained["manifest"].metrics if k.startswith("test_auc_")}
    assert len(auc) >= 3 and set(m) == auc | {"train_loss"}  # the UI charts only the loss curve and the test AUCs
    assert int(p["models"]) == len(trained["manifest"].models) and int(p["train_prompts"]) > 0  # counts are params
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) == 16 and history[-1].value < history[0].value  # every 10th step and the last: it learned

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"data_fingerprints.json", "router", "router.json", "split_counts.txt"} <= top
    router = {a.path for a in client.list_artifacts(run.info.run_id, "router")}
    assert {"router/model.int8.onnx", "router/model.onnx", "router/router.json", "router/tokenizer.json"} <= router


def test_experiments_open_as_model_training_and_the_cli_links_the_run(trained, monkeypatch):
    from learned_router.tracking import KIND_TAG, MODEL_TRAINING, run_link

    client = MlflowClient(tracking_uri=trained["url"])
    assert (
        client.get_experiment_by_name("tests").tags[KIND_TAG] == MODEL_TRAINING
    )  # MLflow 3: the runs table, not GenAI
    run = client.get_run(trained["run_id"])
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics?workflowType=machine_learning"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["url"] + "/")
    assert run_link(run) == f"{trained['url']}/{page}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///tmp/x/mlflow.db")
    assert (
        run_link(run) == f"mlflow ui --backend-store-uri sqlite:///tmp/x/mlflow.db, then http://127.0.0.1:5000/{page}"
    )
