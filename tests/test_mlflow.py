"""A training run logged to a real `mlflow server`, read back through MLflow's client."""

from mlflow.tracking import MlflowClient


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
    assert 0 <= m["parity_int8_max_abs_diff"] < 0.15 and m["parity_int8_decision_agreement"] >= 0.95
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) == 16 and history[-1].value < history[0].value  # every 10th step and the last: it learned

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"data_fingerprints.json", "router", "router.json", "split_counts.txt"} <= top
    router = {a.path for a in client.list_artifacts(run.info.run_id, "router")}
    assert {"router/model.int8.onnx", "router/model.onnx", "router/router.json", "router/tokenizer.json"} <= router
