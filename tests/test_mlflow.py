"""A training run logged to a real `mlflow server`, read back through MLflow's client."""

from mlflow.tracking import MlflowClient


def test_run_is_in_the_tracking_server(trained):
    client = MlflowClient(tracking_uri=trained["url"])
    run = client.get_run(trained["run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["strong"] == "gpt-4-1106-preview" and p["label_policy"] == "weak >= strong - 0 (ties train as 0.5)"
    assert p["encoder"] == "all-MiniLM-L6-v2" and len(p["data_routellm_gsm8k_sha256"]) == 16
    m = run.data.metrics
    assert m["test_auc"] == trained["manifest"].metrics["test_auc"]
    assert 0 <= m["parity_int8_max_abs_diff"] < 0.15 and m["parity_int8_decision_agreement"] >= 0.95
    assert (p["encoder_layers"], p["head_hidden"], p["head_lexical_c"], p["head_neighbours"]) == ("3", "0", "0.3", "30")
    assert 0.5 < m["best_val_auc"] <= 1 and m["epochs_run"] == 0  # fitted in closed form: no epochs to log

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"data_fingerprints.json", "router", "router.json", "split_counts.txt", "val_frontier.png"} <= top
    router = {a.path for a in client.list_artifacts(run.info.run_id, "router")}
    assert {"router/model.int8.onnx", "router/model.onnx", "router/router.json", "router/tokenizer.json"} <= router
    png = client.download_artifacts(run.info.run_id, "val_frontier.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
