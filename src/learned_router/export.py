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

import pandas as pd

from . import parity
from .errors import RouterError
from .manifest import VARIANT_FILES, ExportCheck, Manifest, RouterFolder, TrainingRecord
from .tasktypes import FILE as TYPES_FILE

log = logging.getLogger(__name__)

# Built-in probe prompts (no user data): the exporter checks each graph on them and on the caller's held-out prompts,
# and router.json keeps the torch model's outputs on them, which `Router` compares with when it loads the folder.
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
    "What's the capital of Australia?",
    "Give me three name ideas for a coffee shop near the sea.",
    "Solve for x: 3x + 7 = 22.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "Is it safe to eat raw cookie dough? Answer briefly.",
    "Explain quantum entanglement to a ten-year-old.",
    "Refactor this JavaScript to use async/await: fetch(url).then(r => r.json()).then(d => console.log(d));",
    "What are the main differences between TCP and UDP?",
    "Write a short story about a robot who learns to paint, in under 200 words.",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "Prove that the square root of 2 is irrational.",
    "Suggest a weekly workout plan for a beginner who has 30 minutes a day.",
    "Find all integer solutions of x^2 - y^2 = 17.",
    "thanks!",
    "Describe the water cycle.",
    "Implement a thread-safe LRU cache in Java with O(1) get and put, and explain how you tested it.",
    "What does 'carpe diem' mean?",
    "Analyse the themes of guilt and ambition in Macbeth, citing two scenes.",
    "Which is larger, 9.11 or 9.9?",
    "Write a regular expression that matches a valid IPv4 address.",
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
        raise RouterError(
            f"{path}: this encoder's weights differ from the ones the router in {folder.path} was trained on"
        )
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
    """Write model.onnx (graph-optimised fp32) and, when asked, model.int8.onnx into `folder`; returns the fused-op
    counts."""
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
            fused,
            (ids, torch.ones_like(ids)),
            str(raw),
            input_names=["input_ids", "attention_mask"],
            output_names=["quality", "difficulty", "embedding"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                "quality": {0: "batch"},
                "difficulty": {0: "batch"},
                "embedding": {0: "batch"},
            },
        )
    cfg = transformer.config
    opt = optimizer.optimize_model(
        str(raw), model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size
    )
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(fp32))
    raw.unlink()
    if "int8" in variants:  # the encoder's matmuls only: see head_matmuls
        quantize_dynamic(
            str(fp32),
            str(folder / VARIANT_FILES["int8"]),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=head_matmuls(opt.model),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return stats


def head_matmuls(graph_model) -> list[str]:
    """The head's layers, kept fp32 in the int8 graph (tiny, so no speed lost): their input joins the unit embedding
    (components ~0.05) and the standardised log length (up to ~3), and one dynamic int8 scale for both would quantize
    the embedding on the length's coarse scale. The quantizer turns a Gemm named X into a MatMul named X_MatMul
    before it matches exclusions, so both names are given."""
    names = [n.name for n in graph_model.graph.node if n.name.startswith("/head/") and n.op_type in ("Gemm", "MatMul")]
    return names + [f"{n}_MatMul" for n in names]


def export_into(
    folder: RouterFolder, variants: list[str], probes: list[str] | None = None, graded: pd.DataFrame | None = None
) -> Manifest:
    """Build the ONNX files, tokenizer and manifest in `folder` from its checkpoint, each graph judged against the
    torch model (`parity.judge`) on the built-in probes plus `probes`, and routing quality on `graded` (columns
    prompt, weak, strong: the pair's absolute grades). fp32 that fails raises ExportError (nothing is written); int8
    that fails is left out and the fp32 graph written in its place, `check.reasons` saying why."""
    from .model import QualityModel
    from .scorer import Router

    if not variants or any(v not in VARIANT_FILES for v in variants):
        raise RouterError(f"variants must be a non-empty subset of {sorted(VARIANT_FILES)}, got {variants}")
    record = folder.record()
    enc_path = encoder_dir(folder, record)
    model = QualityModel.load(folder.path, enc_path)  # before the slow part: a broken head.pt fails at once
    built = ["fp32", *(["int8"] if "int8" in variants else [])]
    fused_ops = to_onnx(folder.checkpoint, enc_path, record.encoder.layers, folder.path, built)
    shutil.copyfile(enc_path / RouterFolder.TOKENIZER, folder.tokenizer_path)
    manifest = Manifest(
        name=record.name,
        models=model.head.cfg.models,
        strong=record.strong,
        weak=record.weak,
        encoder=record.encoder,
        default_threshold=record.default_threshold,
        calibration=record.calibration,
        files={},
        data=record.data,
        metrics=record.metrics,
        versions=versions(),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )

    prompts = list(
        dict.fromkeys(PROBES + list(probes or []) + (graded["prompt"].tolist() if graded is not None else []))
    )
    torch_out = model.predict(prompts, cache=False)
    reference = torch_out.quality, torch_out.difficulty
    pair = torch_out.models.index(record.weak), torch_out.models.index(record.strong)
    rows = {p: i for i, p in enumerate(prompts)}
    grades = (
        None
        if graded is None
        else parity.Graded(
            graded["prompt"].map(rows).to_numpy(), graded["weak"].to_numpy(float), graded["strong"].to_numpy(float)
        )
    )
    check = ExportCheck(
        cpu=parity.cpu(),
        onnxruntime=versions().get("onnxruntime", ""),
        passed={},
        models=[record.weak, record.strong],
        probes=PROBES,
        quality=reference[0][: len(PROBES)][:, pair].tolist(),
        difficulty=reference[1][: len(PROBES)].tolist(),
    )
    for v in built:
        manifest.files = {v: folder.entry(VARIANT_FILES[v]), "tokenizer": folder.entry(RouterFolder.TOKENIZER)}
        folder.write_manifest(manifest)
        graph_out = Router(folder.path, variant=v).predict(prompts)
        verdict = parity.judge(
            v,
            (graph_out.quality, graph_out.difficulty),
            reference,
            pair,
            manifest.default_threshold,
            manifest.calibration.prompts,
            grades,
        )
        manifest.parity |= {f"{v}_{k}": x for k, x in verdict.figures().items()}
        check.passed[v] = verdict.passed
        if not verdict.passed:
            check.reasons[v] = f"{verdict.summary()}: {'; '.join(verdict.failures)}"
        if v == "fp32" and not verdict.passed:
            raise ExportError(f"fp32 export disagrees with the torch model on {check.reasons[v]}; nothing written")
    kept = [v for v in built if check.passed[v] and (v in variants or not check.passed.get("int8", True))]
    for v in set(built) - set(kept):
        folder.model_path(v).unlink()
    manifest.files = {v: folder.entry(VARIANT_FILES[v]) for v in kept} | {
        "tokenizer": folder.entry(RouterFolder.TOKENIZER)
    }
    manifest.parity["probes"] = len(prompts)
    manifest.parity.update({f"fused_{k}": float(n) for k, n in fused_ops.items()})
    manifest.check = check
    folder.write_manifest(manifest)
    if note := fallback_note(manifest):
        log.warning(note)
    return manifest


def fallback_note(manifest: Manifest) -> str | None:
    """One line when the int8 graph failed its check and the fp32 graph was written instead."""
    check = manifest.check
    if check is None or check.passed.get("int8", True):
        return None
    return (
        f"int8 left out: on this CPU ({check.cpu}) it routes unlike the torch model ({check.reasons['int8']}); "
        f"the fp32 graph is written instead. To retry: learned-router export --router FOLDER --variants int8 "
        f"on the CPU that will serve it"
    )


def export(
    router: Path, out: Path | None = None, variants: list[str] = ("fp32", "int8"), overwrite: bool = False
) -> Manifest:
    """Re-export a trained router folder (its checkpoint/) to `out` (default: in place)."""
    source = RouterFolder(router)
    source.record()  # a clear error for a folder without a readable training record
    out = Path(out) if out else source.path
    with staged_folder(out, overwrite=overwrite or out.resolve() == source.path.resolve()) as tmp:
        shutil.copytree(source.checkpoint, tmp / RouterFolder.CHECKPOINT)
        if (types := source.path / TYPES_FILE).is_file():  # the folder's own task types stay with it
            shutil.copyfile(types, tmp / TYPES_FILE)
        return export_into(RouterFolder(tmp), list(variants))
