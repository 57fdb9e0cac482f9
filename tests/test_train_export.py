"""Training on real slices, the exported router folder, parity with torch, atomic writes, re-export."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import STRONG, WEAK
from learned_router import Router, RouterError, RouterFolderError
from learned_router.embed import Encoder
from learned_router.export import PROBES, export
from learned_router.model import FitConfig, Head, HeadConfig, fit_head
from learned_router.train import TrainSpec, train


def test_router_folder_and_manifest(trained):
    folder, m = trained["path"], trained["manifest"]
    assert {p.name for p in folder.iterdir()} == {"router.json", "tokenizer.json", "model.onnx", "model.int8.onnx", "checkpoint"}
    assert (m.strong, m.weak) == (STRONG, WEAK)
    assert m.label_policy.kind == "relative" and m.encoder.max_seq_length == 256 and m.encoder.dim == 384
    assert {d["name"] for d in m.data} == {"routellm_gsm8k", "arena_bench_v1", "alpaca_eval"}
    assert all(len(d["sha256"]) == 64 and d["prompts"] > 0 for d in m.data)
    assert 0.6 < m.metrics["test_auc"] <= 1.0  # GSM8K vs AlpacaEval base rates alone make this learnable
    # calibration: threshold -> share of strong calls, monotone from 0 to 1
    fr = [p.strong_fraction for p in m.calibration]
    assert fr[0] == 0.0 and fr[-1] == 1.0 and all(a <= b for a, b in zip(fr, fr[1:]))
    assert m.threshold_for(0.3) == pytest.approx(m.threshold_for(0.3))
    assert abs(m.strong_fraction_at(m.threshold_for(0.3)) - 0.3) < 0.05
    # export fused the transformer into onnxruntime's Attention kernels: the 3 of its 6 layers the recipe keeps
    assert m.encoder.layers == 3 and m.parity["fused_Attention"] == 3.0


def test_exported_graph_matches_torch(trained):
    folder = trained["path"]
    prompts = PROBES + ["What is the derivative of x^3 sin(x)?", "Tell me a joke about databases."]
    head = Head.load(folder / "checkpoint")
    assert head.cfg.length_input  # the shipped recipe: the graph computes the prompt's length from its token ids
    assert head.cfg.sources == 3  # ... and the word-piece bag of its lexical experts, one per training source
    assert head.cfg.memory == trained["manifest"].metrics["train_prompts"]  # ... and a kNN over its training prompts
    enc = Encoder(layers=trained["manifest"].encoder.layers)
    with pytest.raises(ValueError, match="word-piece bags"):
        head.predict(enc.features(prompts, length=True, progress=False))
    reference = head.predict(enc.features(prompts, length=True, progress=False), enc.bags(prompts))
    fp32 = Router(folder, variant="fp32").score(prompts)
    int8 = Router(folder, variant="int8").score(prompts)
    assert np.max(np.abs(fp32 - reference)) < 1e-4
    assert np.max(np.abs(int8 - reference)) < 0.15
    m = trained["manifest"]
    assert m.parity["fp32_max_abs_diff"] < 1e-4 and m.parity["fp32_decision_agreement"] == 1.0
    assert m.parity["int8_max_abs_diff"] < 0.15 and m.parity["int8_decision_agreement"] >= 0.95
    int8_nodes = onnx.load(str(folder / "model.int8.onnx")).graph.node
    quantized = [n.name for n in int8_nodes if n.op_type == "MatMulInteger"]
    # the encoder and the kNN's similarities int8, the head's layers fp32
    assert quantized and [n for n in quantized if n.startswith("/head/")] == ["/head/neighbours/MatMul_quant"]


def test_head_training_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int8)
    w = np.ones(300)

    def run(seed):
        head, info = fit_head(HeadConfig(dim=16, hidden=8), x[:200], y[:200], w[:200], x[200:], y[200:],
                              FitConfig(epochs=30, lr=1e-2, batch_size=32, seed=seed))
        return head.predict(x[200:]), info

    (a, fa), (b, fb), (c, _) = run(0), run(0), run(1)
    assert np.array_equal(a, b) and fa == fb
    assert not np.array_equal(a, c)
    assert fa["best_val_auc"] > 0.9  # early stopping kept a good epoch


def test_source_offsets_learn_the_within_source_trend():
    """Two sources whose pass rates run against a feature's within-source effect: pooled, the head spends the
    feature on the sources' base rates; with per-source offsets it learns the within-source trend."""
    rng = np.random.default_rng(0)
    n = 2000
    src = rng.integers(0, 2, n)
    f = rng.normal(size=n) + 2.0 * src  # source 1 has larger f ...
    logit = 2.0 * (f - 2.0 * src) - 2.0 * src  # ... a higher f passes more within a source, source 1 passes less
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    x = np.c_[f, rng.normal(size=(n, 7))].astype(np.float32)
    tr, va, te = slice(0, 1200), slice(1200, 1600), slice(1600, n)
    cfg = HeadConfig(dim=8, hidden=16)

    def within_source_auc(offsets):
        head, _ = fit_head(cfg, x[tr], y[tr], np.ones(1200), x[va], y[va], FitConfig(epochs=60, lr=1e-2, seed=0, source_offsets=offsets),
                           sources=(src[tr], src[va]))
        p, yt, st = head.predict(x[te]), y[te], src[te]
        return min(roc_auc_score(yt[st == s], p[st == s]) for s in (0, 1)), p

    pooled, _ = within_source_auc(False)
    offset, p = within_source_auc(True)
    assert offset > 0.75 and offset > pooled + 0.05
    assert abs(p.mean() - y.mean()) < 0.15  # the offsets' mean is folded into the bias: still a pass chance
    with pytest.raises(ValueError, match="needs the rows' sources"):
        fit_head(cfg, x[tr], y[tr], np.ones(1200), x[va], y[va], FitConfig(epochs=1, source_offsets=True))


def test_tie_targets_rank_by_the_quality_gap_and_stay_calibrated_to_the_label():
    """Exact-match grades: the label lumps "the weak answer wins" with ties. Here u1 raises the strong model's wins
    and u2 the weak model's: the gap (strong - weak) rises with u1 and falls with u2, the label sees u1 only. Ties
    trained toward 0.5 rank by the expected gap; Platt scaling on the validation labels keeps p_weak a pass chance."""
    rng = np.random.default_rng(0)
    n = 4000
    u1, u2, r = rng.uniform(size=n), rng.uniform(size=n), rng.random(n)
    strong_wins, weak_wins = r < 0.2 + 0.3 * u1, r > 1 - 0.4 * u2
    label = (~strong_wins).astype(np.int8)
    target = np.where(strong_wins, 0.0, np.where(weak_wins, 1.0, 0.5)).astype(np.float32)
    x = np.c_[u1, u2, rng.normal(size=(n, 2))].astype(np.float32)
    tr, va, te = slice(0, 2400), slice(2400, 3200), slice(3200, n)
    gap = 0.3 * u1[te] - 0.4 * u2[te]  # P(strong wins) - P(weak wins), less a constant

    def fit(y):
        head, _ = fit_head(HeadConfig(dim=4, hidden=16), x[tr], y[tr], np.ones(2400), x[va], label[va], FitConfig(epochs=60, lr=1e-2, seed=0))
        return head.predict(x[te])

    p_label, p_tie = fit(label), fit(target)
    assert np.corrcoef(1 - p_tie, gap)[0, 1] > 0.9 > 0.7 > np.corrcoef(1 - p_label, gap)[0, 1]
    assert abs(p_tie.mean() - label[te].mean()) < 0.03  # calibrated to the label, not to the 0.5s


def test_length_input_is_standardised_and_clipped_to_the_training_range():
    rng = np.random.default_rng(0)
    chars = np.exp(rng.uniform(np.log(20), np.log(800), 400))
    x = np.c_[rng.normal(size=(400, 4)), chars].astype(np.float32)
    y = (chars > 150).astype(np.int8)  # longer prompts pass
    head, _ = fit_head(HeadConfig(dim=4, hidden=8, length_input=True), x[:300], y[:300], np.ones(300), x[300:], y[300:],
                       FitConfig(epochs=40, lr=1e-2, seed=0))
    lo, hi = head.cfg.length_range
    assert np.exp(lo) == pytest.approx(chars[:300].min(), rel=1e-5) and np.exp(hi) == pytest.approx(chars[:300].max(), rel=1e-5)
    probe = np.repeat(x[:1], 4, axis=0)
    probe[:, -1] = [1.0, np.exp(lo), np.exp(hi), 1e6]
    p = head.predict(probe)
    assert p[0] == pytest.approx(p[1]) and p[2] == pytest.approx(p[3])  # no extrapolation past the training lengths
    assert p[2] > p[1] + 0.5


def test_length_feature_is_the_graphs():
    """The length column is the characters of the prompt's word pieces, after the encoder's truncation."""
    enc = Encoder(max_seq_length=16)
    x = enc.features(["Unbelievable results, 12345!", "word " * 100], length=True, progress=False, cache=False)
    assert x.shape == (2, 385)
    assert x[0, -1] == len("Unbelievableresults,12345!")  # uncased pieces, no spaces
    assert x[1, -1] == 14 * len("word")  # 16 tokens: [CLS], 14 words, [SEP]
    assert np.array_equal(x[:, :384], enc.embed(["Unbelievable results, 12345!", "word " * 100], progress=False, cache=False))


def test_encoder_layers_embed_the_mean_of_that_layer():
    """layers=k embeds the mean of the k-th block's token states (unit-normalised); all blocks is the plain encoder."""
    from transformers import AutoModel

    texts = ["How many apples are left if I eat two of five?", "Name the capital of France."]
    enc = Encoder(layers=3)
    model = AutoModel.from_pretrained(str(enc.path), local_files_only=True)
    batch = enc.model.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states[3]
    mask = batch["attention_mask"].unsqueeze(-1)
    expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert enc.layers == 3 and np.allclose(enc.embed(texts, progress=False, cache=False), expected, atol=1e-5)
    assert Encoder(layers=6)._key("x") == Encoder()._key("x") != enc._key("x")  # cached apart, the whole encoder alike
    with pytest.raises(RouterError, match="1 to its 6 transformer blocks, got 7"):
        Encoder(layers=7)


def test_word_piece_bags_are_binary_normalised_and_truncated():
    enc = Encoder(max_seq_length=16)
    bags = enc.bags(["the cat and the cat", "word " * 100, ""])
    tok = enc.model.tokenizer
    assert bags.shape == (3, tok.vocab_size)
    first = dict(zip(bags[0].indices, bags[0].data))
    assert set(first) == set(tok.convert_tokens_to_ids(["the", "cat", "and"]))  # distinct pieces, no [CLS]/[SEP]
    assert np.allclose(list(first.values()), 1 / np.sqrt(3))
    assert bags[1].nnz == 1 and bags[2].nnz == 0  # truncated to 14 pieces of one word; an empty prompt has none


def test_lexical_experts_learn_words_per_source_and_the_gate_picks_the_expert():
    """Word 0 makes the weak model pass in source 0 and fail in source 1; the embedding says which source a prompt
    is from. A bag fitted on both sources at once cannot learn word 0; the gated experts can."""
    from scipy import sparse

    rng = np.random.default_rng(0)
    n, vocab = 3000, 40
    src = rng.integers(0, 2, n)
    has = rng.random(n) < 0.5
    logit = np.where(has, np.where(src == 0, 2.0, -2.0), 0.0)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    words = [np.unique(np.r_[[0] * int(h), rng.integers(1, vocab, 6)]) for h in has]
    bags = sparse.csr_matrix([[1.0 if j in w else 0.0 for j in range(vocab)] for w in words], dtype=np.float32)
    bags = sparse.csr_matrix(bags.multiply(1 / np.sqrt(bags.sum(1))))
    x = np.c_[np.where(src == 0, 1.0, -1.0) + rng.normal(scale=0.3, size=n), rng.normal(size=(n, 3))].astype(np.float32)
    tr, va, te = slice(0, 1800), slice(1800, 2400), slice(2400, n)

    def within_source_auc(c, hidden=8):
        head, _ = fit_head(HeadConfig(dim=4, hidden=hidden, lexical_c=c), x[tr], y[tr], np.ones(1800), x[va], y[va],
                           FitConfig(epochs=30, lr=1e-2, seed=0, source_offsets=True), sources=(src[tr], src[va]),
                           bags=(bags[tr], bags[va]))
        p = head.predict(x[te], bags[te])
        return min(roc_auc_score(y[te][src[te] == s], p[src[te] == s]) for s in (0, 1)), head, p

    plain, _, _ = within_source_auc(0.0)
    lexical, head, p = within_source_auc(1.0)
    assert lexical > 0.7 and lexical > plain + 0.1
    assert head.cfg.sources == 2 and head.lexicon[0, 0] > 0 > head.lexicon[0, 1]
    assert abs(p.mean() - y[te].mean()) < 0.05  # recalibrated after the experts were added
    alone, head, p = within_source_auc(1.0, hidden=0)  # no MLP: the experts alone, with one bias for all
    assert alone > 0.7 and not hasattr(head, "net") and abs(p.mean() - y[te].mean()) < 0.05
    assert torch.allclose(head.expert_bias, head.expert_bias[0].expand(2))
    with pytest.raises(ValueError, match="without an MLP"):
        fit_head(HeadConfig(dim=4, hidden=0), x[tr], y[tr], np.ones(1800), x[va], y[va], FitConfig(epochs=1))
    with pytest.raises(ValueError, match="word-piece bags and sources"):
        fit_head(HeadConfig(dim=4, lexical_c=1.0), x[tr], y[tr], np.ones(1800), x[va], y[va], FitConfig(epochs=1))


def test_source_centred_targets_share_the_pooled_mean_and_keep_their_order():
    from learned_router.lexical import source_centred

    t, w, src = np.array([0.1, 0.3, 0.7, 0.9, 1.0]), np.array([1.0, 1.0, 1.0, 1.0, 2.0]), np.array([0, 0, 1, 1, 1])
    c = source_centred(t, w, src)
    pooled = np.average(t, weights=w)
    assert c[:2] == pytest.approx([pooled - 0.1, pooled + 0.1])  # source 0's mean 0.2 moved to the pooled mean
    assert np.all(np.diff(c[2:]) >= 0) and c.max() <= 1.0  # source 1's order kept, clipped to [0, 1]


def test_export_in_place_and_to_new_folder(trained, tmp_path):
    src = tmp_path / "r"
    shutil.copytree(trained["path"], src)
    m = export(src, tmp_path / "int8only", variants=["int8"])
    assert {p.name for p in (tmp_path / "int8only").iterdir()} == {"router.json", "tokenizer.json", "model.int8.onnx", "checkpoint"}
    assert set(m.files) == {"int8", "tokenizer"}
    with pytest.raises(RouterError, match="already exists"):
        export(src, tmp_path / "int8only", variants=["int8"])
    before = json.loads((src / "router.json").read_text())
    export(src, variants=["fp32"])  # in place
    assert set(json.loads((src / "router.json").read_text())["files"]) == {"fp32", "tokenizer"}
    assert before["calibration"] == json.loads((src / "router.json").read_text())["calibration"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_export_refuses_a_drifting_graph(trained, tmp_path, monkeypatch):
    import learned_router.export as ex

    monkeypatch.setitem(ex.TOLERANCE, "int8", {**ex.TOLERANCE["int8"], "max_abs_diff": 1e-9})
    with pytest.raises(ex.ExportError, match=r"int8 export disagrees .* max \|dp\|.*nothing written"):
        export(trained["path"], tmp_path / "drift", variants=["int8"])
    assert list(tmp_path.iterdir()) == []


def test_decision_agreement_counts_clear_probes_only():
    from learned_router.export import decision_agreement

    reference = np.array([0.10, 0.495, 0.505, 0.90])
    assert decision_agreement(np.array([0.12, 0.51, 0.49, 0.88]), reference, 0.5, 0.02) == 1.0  # two ties flipped
    assert decision_agreement(np.array([0.60, 0.51, 0.49, 0.88]), reference, 0.5, 0.02) == 0.5  # a clear one flipped
    assert decision_agreement(np.array([0.51, 0.49]), np.array([0.499, 0.501]), 0.5, 0.02) == 1.0  # all ties


def test_export_of_a_head_that_scores_everything_at_the_threshold(trained, tmp_path):
    """Probes within int8's noise of the threshold are ties, not disagreements: such a router still exports."""
    src = tmp_path / "flat"
    shutil.copytree(trained["path"], src)
    head = Head.load(src / "checkpoint")
    t = trained["manifest"].default_threshold
    enc = Encoder(layers=trained["manifest"].encoder.layers)
    emb, bags = torch.from_numpy(enc.features(PROBES, length=True, progress=False)), enc.bags(PROBES)
    with torch.no_grad():  # logits squeezed 1000x and centred on the threshold: int8's noise straddles it
        for part in (head.lexicon, head.expert_weight, head.expert_bias, head.neighbours.scale):
            part.mul_(1e-3)
        head.expert_bias.add_(float(np.log(t / (1 - t)) - head(emb, bags).median()))  # the gate's weights sum to 1
    head.save(src / "checkpoint")
    m = export(src, variants=["int8"])
    assert np.all(np.abs(Router(src).score(PROBES) - t) < 0.02)
    assert m.parity["int8_decision_agreement"] == 1.0


def test_failed_training_leaves_nothing(tmp_path, datasets_dir):
    out = tmp_path / "never"
    spec = TrainSpec(data=[str(datasets_dir / "routellm_gsm8k.parquet")], strong=STRONG, weak="no-such-model", out=out)
    with pytest.raises(RouterError, match="'no-such-model' is not in source"):
        train(spec)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_and_export_needs_checkpoint(trained, tmp_path):
    spec = TrainSpec(data=[str(trained["spec"].data[0])], strong=STRONG, weak=WEAK, out=trained["path"])
    with pytest.raises(RouterError, match="already exists"):
        train(spec)
    bare = tmp_path / "bare"
    shutil.copytree(trained["path"], bare, ignore=shutil.ignore_patterns("checkpoint"))
    with pytest.raises(RouterError, match="no checkpoint/training.json"):
        export(bare)


def test_broken_router_folders_are_named(trained, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(trained["path"], bad, ignore=shutil.ignore_patterns("checkpoint", "model.onnx"))
    with pytest.raises(RouterFolderError, match="model.onnx: missing"):
        Router(bad, variant="fp32")
    with pytest.raises(RouterFolderError, match="no 'bf16' model"):
        Router(bad, variant="bf16")
    with open(bad / "model.int8.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"garbage")
    with pytest.raises(RouterFolderError, match="model.int8.onnx: corrupted"):
        Router(bad)
    shutil.copyfile(trained["path"] / "model.int8.onnx", bad / "model.int8.onnx")
    (bad / "tokenizer.json").unlink()
    with pytest.raises(RouterFolderError, match="tokenizer.json: missing"):
        Router(bad)
    (bad / "router.json").write_text("{not json")
    with pytest.raises(RouterFolderError, match="router.json: not valid JSON"):
        Router(bad)
    (bad / "router.json").write_text('{"format_version": 1}')
    with pytest.raises(RouterFolderError, match="router.json: field 'name'"):
        Router(bad)
    (bad / "router.json").unlink()
    with pytest.raises(RouterFolderError, match="router.json: missing"):
        Router(bad)


def test_finetuning_saves_the_encoder_and_exports_it(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["url"])
    kw = dict(data=trained["spec"].data[:1], strong=STRONG, weak=WEAK, out=tmp_path / "ft", max_prompts=60,
              fit=FitConfig(epochs=5), variants=["fp32"], experiment="tests")
    with pytest.raises(RouterError, match="kNN remembers: train with --neighbours 0"):
        TrainSpec(**kw, finetune_epochs=1)  # the recipe's kNN would hold base-encoder embeddings
    with pytest.raises(RouterError, match="needs lexical experts"):
        TrainSpec(**kw, head=HeadConfig(hidden=0, lexical_c=0.0))
    assert not (tmp_path / "ft").exists()
    m, _ = train(TrainSpec(**kw, finetune_epochs=1, head=HeadConfig(hidden=0, length_input=True, lexical_c=0.3)))
    assert (tmp_path / "ft" / "checkpoint" / "encoder" / "model.safetensors").is_file()
    assert "finetune_best_val_auc" in m.metrics
    assert m.parity["fp32_max_abs_diff"] < 1e-4  # the graph holds the fine-tuned encoder, not the base one
