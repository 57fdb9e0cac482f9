"""Export a trained router to one ONNX graph (token ids -> each model's quality, the prompt's difficulty and its sentence
embedding), fused and int8-quantised, with parity checks."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import shutil
import uuid
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import RouterError
from .manifest import VARIANT_FILES, Manifest, RouterFolder, TrainingRecord
from .tasktypes import FILE as TYPES_FILE

# The exported graph must stay this close to the torch model on the probe prompts, or nothing is written.
# fp32 must match to float noise. int8's dynamic quantisation moves the sentence embedding by ~0.1 (L2), and a
# sharp head (one trained on a few hundred prompts) by up to ~0.2 in probability; what matters there is the routing
# decision, so int8 is held to decision agreement at the default threshold, with a bound on |dp| that still catches
# a broken export (a wrong graph moves outputs by ~0.5). A probe whose
# torch probability lies within `tie_band` of the threshold is a tie at that precision and does not count towards
# agreement (a head trained on little data can put every probe there).
TOLERANCE = {"fp32": {"max_abs_diff": 1e-3, "decision_agreement": 1.0, "tie_band": 1e-3},
             "int8": {"max_abs_diff": 0.25, "decision_agreement": 0.95, "tie_band": 0.02}}
PROBES = [
    "What is 2+2?",
    "hi",
    "Translate 'good morning' into French.",
    "Prove that there are infinitely many primes.",
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "Explain the difference between a process and a thread in operating systems, with examples.",
    "A train leaves at 3pm going 60 mph; another leaves at 4pm going 80 mph. When does the second catch up?",
    "Summarize the causes of the French Revolution in three bullet points.",
    "Write a Python function that returns the n-th Fibonacci number using memoization, and explain its complexity.",
    "Which of these is a mammal?\nA. Shark\nB. Dolphin\nC. Trout\nD. Octopus\nAnswer:",
    "Draft a polite email to my landlord asking to fix the heating, which has been broken for a week. " * 3,
    "Compare the economic policies of Keynesian and Austrian schools. " * 25,  # longer than the encoder's limit
]


class ExportError(RouterError):
    """The exported graph disagrees with the torch model, or the export could not be built."""


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool):
    """Yield a fresh sibling folder; it replaces `out` only if the block succeeds, else it is removed."""
    out = Path(out)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise RouterError(f"{out}: already exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def versions() -> dict[str, str]:
    names = ["learned-router", "torch", "transformers", "sentence-transformers", "onnx", "onnxruntime", "tokenizers"]
    out = {}
    for n in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[n] = metadata.version(n)
    return out


def encoder_dir(folder: RouterFolder, record: TrainingRecord) -> Path:
    """The encoder the router was trained on, checked by its weights' fingerprint."""
    from .embed import Encoder, encoder_fingerprint

    path = Encoder(record.encoder_path).path
    if encoder_fingerprint(path) != record.encoder.fingerprint:
        raise RouterError(f"{path}: this encoder's weights differ from the ones the router in {folder.path} was trained on")
    return path


@contextlib.contextmanager
def root_logger_at(level: int):
    """The root logger at `level` inside the block (or decorated call), its own level restored after."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)


@root_logger_at(logging.ERROR)  # onnxruntime's quantizer advises pre-processing on the root logger
def to_onnx(checkpoint: Path, enc_path: Path, layers: int, folder: Path, variants: list[str]) -> dict:
    """Write model.onnx (graph-optimised fp32) and/or model.int8.onnx into `folder`; returns the fused-op counts."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer
    from transformers import AutoModel, AutoTokenizer

    from .embed import keep_layers, piece_lengths
    from .model import FusedRouter, QualityHead

    # eager attention: onnxruntime's BERT optimizer fuses its pattern into Attention nodes (SDPA's it does not)
    transformer = AutoModel.from_pretrained(str(enc_path), attn_implementation="eager", local_files_only=True)
    keep_layers(transformer, layers)
    tokenizer = AutoTokenizer.from_pretrained(str(enc_path), local_files_only=True)
    fused = FusedRouter(transformer, QualityHead.load(checkpoint), piece_lengths(tokenizer)).eval()
    raw, fp32 = folder / "raw.onnx", folder / VARIANT_FILES["fp32"]
    ids = torch.ones(2, 16, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript tracer warnings about data-dependent branches in transformers
        torch.onnx.export(
            fused, (ids, torch.ones_like(ids)), str(raw), input_names=["input_ids", "attention_mask"],
            output_names=["quality", "difficulty", "embedding"], opset_version=17, dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                          "quality": {0: "batch"}, "difficulty": {0: "batch"}, "embedding": {0: "batch"}},
        )
    cfg = transformer.config
    opt = optimizer.optimize_model(str(raw), model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size)
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(fp32))
    raw.unlink()
    if "int8" in variants:  # the encoder's matmuls only: see head_matmuls
        quantize_dynamic(str(fp32), str(folder / VARIANT_FILES["int8"]), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=head_matmuls(opt.model),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    if "fp32" not in variants:
        fp32.unlink()
    return stats


def head_matmuls(graph_model) -> list[str]:
    """The head's layers, kept fp32 in the int8 graph (tiny, so no speed lost): their input joins the unit embedding
    (components ~0.05) and the standardised log length (up to ~3), and one dynamic int8 scale for both would quantize
    the embedding on the length's coarse scale. The quantizer turns a Gemm named X into a MatMul named X_MatMul
    before it matches exclusions, so both names are given."""
    names = [n.name for n in graph_model.graph.node if n.name.startswith("/head/") and n.op_type in ("Gemm", "MatMul")]
    return names + [f"{n}_MatMul" for n in names]


def decision_agreement(p: np.ndarray, reference: np.ndarray, threshold: float, tie_band: float) -> float:
    """Share of probes routed alike, among those whose reference pass chance lies farther than `tie_band` from the
    threshold; 1.0 when none does."""
    clear = np.abs(reference - threshold) > tie_band
    return float(np.mean((p >= threshold)[clear] == (reference >= threshold)[clear])) if clear.any() else 1.0


def export_into(folder: RouterFolder, variants: list[str], probes: list[str] | None = None) -> Manifest:
    """Build the ONNX files, tokenizer and manifest in `folder` from its checkpoint; refuses (raises) when parity
    fails."""
    from .embed import Encoder
    from .model import QualityHead
    from .scorer import Router, pass_chances

    if not variants or any(v not in VARIANT_FILES for v in variants):
        raise RouterError(f"variants must be a non-empty subset of {sorted(VARIANT_FILES)}, got {variants}")
    record = folder.record()
    head = QualityHead.load(folder.checkpoint)  # before the slow part: a broken head.pt fails at once
    enc_path = encoder_dir(folder, record)
    fused_ops = to_onnx(folder.checkpoint, enc_path, record.encoder.layers, folder.path, variants)
    shutil.copyfile(enc_path / RouterFolder.TOKENIZER, folder.tokenizer_path)
    files = {v: folder.entry(VARIANT_FILES[v]) for v in variants} | {"tokenizer": folder.entry(RouterFolder.TOKENIZER)}
    manifest = Manifest(
        name=record.name, models=head.cfg.models, strong=record.strong, weak=record.weak, encoder=record.encoder,
        default_threshold=record.default_threshold, calibration=record.calibration, files=files, data=record.data,
        metrics=record.metrics, versions=versions(), created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    folder.write_manifest(manifest)

    # parity: the exported graph against the torch path used in training (sentence-transformers + head)
    probes = list(probes or []) + PROBES
    enc = Encoder(enc_path, record.encoder.max_seq_length, record.encoder.layers)
    q_ref, d_ref = head.predict(enc.features(probes, head.cfg.length_input, progress=False, cache=False))
    w, s = head.cfg.models.index(record.weak), head.cfg.models.index(record.strong)
    t = manifest.default_threshold
    for v in variants:
        q, d = Router(folder.path, variant=v).predict(probes)
        tol = TOLERANCE[v]
        measured = {"max_abs_diff": float(max(np.max(np.abs(q - q_ref)), np.max(np.abs(d - d_ref)))),
                    "mean_abs_diff": float(np.mean(np.abs(q - q_ref))),
                    "decision_agreement": decision_agreement(pass_chances(q[:, w], q[:, s]), pass_chances(q_ref[:, w], q_ref[:, s]),
                                                             t, tol["tie_band"])}
        manifest.parity |= {f"{v}_{k}": x for k, x in measured.items()}
        if measured["max_abs_diff"] > tol["max_abs_diff"] or measured["decision_agreement"] < tol["decision_agreement"]:
            raise ExportError(
                f"{v} export disagrees with the torch model on {len(probes)} probe prompts: max |dq| "
                f"{measured['max_abs_diff']:.4f} (tolerance {tol['max_abs_diff']}), decision agreement "
                f"{measured['decision_agreement']:.4f} among probes farther than {tol['tie_band']} from the "
                f"threshold {t} (at least {tol['decision_agreement']}); nothing written")
    manifest.parity["probes"] = len(probes)
    manifest.parity.update({f"fused_{k}": float(n) for k, n in fused_ops.items()})
    folder.write_manifest(manifest)
    return manifest


def export(router: Path, out: Path | None = None, variants: list[str] = ("fp32", "int8"), overwrite: bool = False) -> Manifest:
    """Re-export a trained router folder (its checkpoint/) to `out` (default: in place)."""
    source = RouterFolder(router)
    source.record()  # a clear error for a folder without a readable training record
    out = Path(out) if out else source.path
    with staged_folder(out, overwrite=overwrite or out.resolve() == source.path.resolve()) as tmp:
        shutil.copytree(source.checkpoint, tmp / RouterFolder.CHECKPOINT)
        if (types := source.path / TYPES_FILE).is_file():  # the folder's own task types stay with it
            shutil.copyfile(types, tmp / TYPES_FILE)
        return export_into(RouterFolder(tmp), list(variants))
