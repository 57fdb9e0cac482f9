"""The training recipe: one dataclass whose defaults are the shipped recipe (training/README.md says how each was
chosen). `learned-router train` generates its options from these fields; the router folder records them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import RouterError

# The sources of ordinary chat traffic (real users' prompts, open-ended tasks, code), as opposed to exam benchmarks:
# the calibration mix and the leave-one-source-out protocol use them.
CHAT_SOURCES = (
    "arena_bench_v1",
    "arena_battles_1k",
    "arena_hard_v01",
    "vicuna_bench",
    "alpaca_eval",
    "routerbench_mbpp",
    "routerarena",
)


def option(default, help: str):
    """A recipe field: its default and its CLI help (a list default is copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Recipe:
    """How a router is trained."""

    strong: str = option("gpt-4-1106-preview", "The reference strong model: pass chances are against it.")
    weak: str = option(
        "mistralai/Mixtral-8x7B-Instruct-v0.1", "The default weak model (route's pair, default threshold)."
    )
    encoder: str | None = option(
        None, "A sentence-transformers folder (default: all-MiniLM-L6-v2, shipped in a package)."
    )
    encoder_layers: int = option(3, "Embed with the encoder's first N transformer blocks (mean of their token states).")
    max_seq_length: int | None = option(
        128,
        "Tokens of each prompt the encoder reads, the rest cut (None: the "
        "encoder's own 256); 128 routes as 256 within noise at half the cost.",
    )
    length_input: bool = option(True, "Give the quality model the prompt's length beside its embedding.")
    factors: int = option(8, "Prompt traits beside the difficulty (the model-by-prompt interaction's rank; 0: none).")
    steps: int = option(400, "Full-batch Adam steps of the quality model's fit.")
    lr: float = option(0.05, "Adam learning rate.")
    l2: float = option(1e-2, "L2 strength on the traits, the models' loadings and the per-source model offsets.")
    l2_difficulty: float = option(1e-4, "L2 strength on the difficulty's weights.")
    source_balance: float = option(0.5, "A source's total weight ~ its prompts ** this (0: sources count alike).")
    reference: list[str] = option(
        ["arena_bench_v1"],
        "Absolute-graded sources whose link gives the exported quality "
        "(default: a 1-10 grade of chat answers against a reference).",
    )
    calibration: list[str] = option(
        list(CHAT_SOURCES),
        "Sources whose held-out prompts make the calibration mix "
        "(threshold <-> share of strong calls, default threshold).",
    )
    default_strong_fraction: float = option(0.5, "Share of the calibration mix the default threshold sends strong.")
    val: float = option(0.1, "Share of prompts held out for calibration.")
    test: float = option(0.1, "Share of prompts held out for the test metrics.")
    max_prompts: int | None = option(None, "Sample at most N prompts per source (quick runs).")
    seed: int = option(0, "Seed of the split and the fit.")

    def __post_init__(self):
        checks = [
            (self.encoder_layers >= 1, f"--encoder-layers must be at least 1, got {self.encoder_layers}"),
            (self.factors >= 0, f"--factors must be 0 or more, got {self.factors}"),
            (self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
            (0 < self.lr < 10, f"--lr must be in (0, 10), got {self.lr}"),
            (self.l2 >= 0 and self.l2_difficulty >= 0, "--l2 and --l2-difficulty must be 0 or more"),
            (0 <= self.source_balance <= 1, f"--source-balance must be in [0, 1], got {self.source_balance}"),
            (
                0 < self.val < 1 and 0 <= self.test < 1 and self.val + self.test < 1,
                f"--val must be in (0, 1) and --test in [0, 1) with a sum below 1, got {self.val} and {self.test}",
            ),
            (0 < self.default_strong_fraction < 1, "--default-strong-fraction must be in (0, 1)"),
            (self.max_prompts is None or self.max_prompts >= 10, "--max-prompts must be at least 10"),
            (self.strong != self.weak, f"--strong and --weak name the same model {self.strong!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RouterError(message)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
