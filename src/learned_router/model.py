"""The torch side of a router: the quality model on top of the encoder, its fit, and the fused encoder + head.

The quality model (training/README.md): a prompt x has a difficulty d(x) and a few traits v(x), both linear in its
embedding (and log length); a model m has an ability theta_m and a loading a_m on the traits. Its latent quality is

    eta_m(x) = theta_m + a_m . v(x) - d(x)

and each source s sees it through its own grading scheme, with its own scale alpha_s > 0, offset beta_s and
per-model offsets delta_sm (a source's pass rate, its judge's taste for a model):

    absolute: P(grade) = sigmoid(alpha_s * (eta_m + delta_sm) + beta_s)
    versus:   P(m beats o) = sigmoid(alpha_s * (eta_m + delta_sm - eta_o - delta_so))

d(x) cancels in a versus grade, so a preference against a fixed baseline or a human vote never reads as the
prompt's difficulty. The exported quality of m is sigmoid(alpha_ref * eta_m(x) + beta_ref), alpha_ref and beta_ref
the mean links of the reference sources (recipe `reference`), and the exported difficulty sigmoid((d - mean) / std)
over the training prompts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from .embed import Encoder
from .manifest import RouterFolder
from .outputs import Outputs
from .recipe import Recipe

HEAD_FILE = "head.pt"


@dataclass
class HeadConfig:
    """The head's shape, saved with its weights; everything here is set by `fit_head` from the data and recipe."""

    dim: int = 384
    models: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    schemes: list[str] = field(default_factory=list)  # per source: data.SCHEMES
    factors: int = 8
    length_input: bool = True  # the input's last column is the prompt's length in characters (Encoder.features)
    length_mean: float = 0.0  # mean, std and range of log(length) over the training prompts
    length_std: float = 1.0
    length_range: tuple[float, float] = (0.0, 10.0)  # clipped to it: no extrapolation
    reference: list[str] = field(default_factory=list)  # sources whose mean link gives the exported quality
    difficulty_mean: float = 0.0
    difficulty_std: float = 1.0


class QualityHead(nn.Module):
    """A prompt's embedding (+ length) -> each model's quality in [0, 1] and the prompt's difficulty in [0, 1]."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        width, m, s = cfg.dim + cfg.length_input, len(cfg.models), len(cfg.sources)
        self.difficulty = nn.Linear(width, 1)
        self.traits = nn.Linear(width, cfg.factors, bias=False)
        self.ability = nn.Parameter(torch.zeros(m))
        self.loading = nn.Parameter(torch.zeros(m, cfg.factors))
        self.offset = nn.Parameter(torch.zeros(s, m))
        self.log_scale = nn.Parameter(torch.zeros(s))
        self.bias = nn.Parameter(torch.zeros(s))
        self.register_buffer("versus", torch.tensor([x == "versus" for x in cfg.schemes], dtype=torch.bool))
        self.register_buffer("graded", torch.zeros(s, m))  # 1 where the source grades the model (set by `fit_head`)
        self.register_buffer("link", torch.tensor([1.0, 0.0]))  # alpha_ref, beta_ref (set by `fit_head`)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The rows as the layers see them: the standardised, clipped log length in place of the character count."""
        if not self.cfg.length_input:
            return x
        lo, hi = self.cfg.length_range
        z = (torch.log(x[:, -1:].clamp(min=1.0)).clamp(lo, hi) - self.cfg.length_mean) / self.cfg.length_std
        return torch.cat([x[:, :-1], z], dim=-1)

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eta (n, models) without the difficulty, and d (n,)."""
        z = self.inputs(x)
        return self.ability + self.traits(z) @ self.loading.T, self.difficulty(z).squeeze(-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eta, d = self.latent(x)
        quality = torch.sigmoid(self.link[0] * (eta - d.unsqueeze(-1)) + self.link[1])
        difficulty = torch.sigmoid((d - self.cfg.difficulty_mean) / self.cfg.difficulty_std)
        return quality, difficulty

    def offsets(self) -> torch.Tensor:
        """The per-source model offsets. Over the absolute sources they are centred per model (a model's ability is
        what its absolute grades share; only how they differ goes into the offsets); a versus source's are free, so a
        judge's taste for a model stays that source's."""
        graded = self.graded * ~self.versus.unsqueeze(-1)
        mean = (self.offset * graded).sum(0) / graded.sum(0).clamp(min=1.0)
        return torch.where(self.versus.unsqueeze(-1), self.offset, (self.offset - mean) * graded)

    def grade_logits(
        self, x: torch.Tensor, prompt: torch.Tensor, model: torch.Tensor, opponent: torch.Tensor, source: torch.Tensor
    ) -> torch.Tensor:
        """The logit of each observation's grade under its source's scheme (`opponent` is ignored for absolute ones).
        Gathers go through flat 1-D indices: their backward is a plain index_add, fast on CPU."""
        eta, d = self.latent(x)
        m = len(self.cfg.models)
        eta, offset = eta.reshape(-1), self.offsets().reshape(-1)
        mine = eta.index_select(0, prompt * m + model) + offset.index_select(0, source * m + model)
        theirs = eta.index_select(0, prompt * m + opponent) + offset.index_select(0, source * m + opponent)
        scale = self.log_scale.exp().index_select(0, source)
        absolute = scale * (mine - d.index_select(0, prompt)) + self.bias.index_select(0, source)
        return torch.where(self.versus.index_select(0, source), scale * (mine - theirs), absolute)

    def save(self, folder: Path) -> None:
        torch.save({"config": asdict(self.cfg), "state": self.state_dict()}, Path(folder) / HEAD_FILE)

    @classmethod
    def load(cls, folder: Path) -> "QualityHead":
        """The saved head; RouterFolderError naming the file when it is missing, truncated or not a head."""
        from .errors import RouterFolderError

        path = Path(folder) / HEAD_FILE
        if not path.is_file():
            raise RouterFolderError(f"{path}: missing; the router's checkpoint needs it (re-train the router)")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            cfg = blob["config"]
            head = cls(HeadConfig(**{**cfg, "length_range": tuple(cfg["length_range"])}))
            head.load_state_dict(blob["state"])
        except Exception as e:  # torch raises many types for a damaged file
            raise RouterFolderError(
                f"{path}: not a readable head ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            ) from None
        return head.eval()

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.eval()
        q, d = self(torch.from_numpy(np.asarray(x, dtype=np.float32)))
        return q.numpy(), d.numpy()


@dataclass
class QualityModel:
    """The torch predictor (`outputs.Predictor`): the encoder and the quality head over it, predicting what the graph
    exported from them predicts. It owns the head's input: the embedding, and the prompt's length where the head
    reads it. `save` writes the head into a router folder's checkpoint; `load` reads it back with its encoder."""

    encoder: Encoder
    head: QualityHead
    strong: str

    def features(self, prompts: list[str], **kwargs) -> np.ndarray:
        """The head's input rows (Encoder.features); keyword arguments as there, progress off by default."""
        return self.encoder.features(list(prompts), self.head.cfg.length_input, **{"progress": False, **kwargs})

    def predict(self, prompts: list[str], **kwargs) -> Outputs:
        quality, difficulty = self.head.predict(self.features(prompts, **kwargs))
        return Outputs(tuple(self.head.cfg.models), self.strong, quality, difficulty)

    def save(self, checkpoint: Path) -> None:
        self.head.save(checkpoint)

    @classmethod
    def load(
        cls, router_dir: str | Path, encoder_path: str | Path | None = None, max_seq_length: int | None = None
    ) -> "QualityModel":
        """A router folder's torch model; its encoder from `encoder_path` (default: the one it was trained with),
        reading `max_seq_length` tokens (default: as in training)."""
        folder = RouterFolder(router_dir)
        record = folder.record()
        head = QualityHead.load(folder.checkpoint)  # before the encoder: a broken head.pt fails at once
        enc = Encoder(
            encoder_path or record.encoder_path, max_seq_length or record.encoder.max_seq_length, record.encoder.layers
        )
        return cls(enc, head, record.strong)


def auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def observation_weights(sources: np.ndarray, prompts: np.ndarray, user: np.ndarray, balance: float) -> np.ndarray:
    """Each source's observations share a total weight proportional to (its distinct prompts) ** balance, times the
    user's --weight for it; mean 1 over all observations."""
    w = np.ones(len(sources))
    for s in np.unique(sources):
        rows = sources == s
        w[rows] = len(np.unique(prompts[rows])) ** balance / rows.sum() * user[rows][0]
    return w * len(w) / w.sum()


def fit_head(
    x: np.ndarray,
    obs: dict[str, np.ndarray],
    models: list[str],
    sources: list[str],
    schemes: list[str],
    cfg: Recipe,
    on_step=lambda step, loss: None,
) -> QualityHead:
    """Fit the quality model on the prompts' features `x` (one row per prompt) and the observations `obs`: int
    arrays prompt, model, opponent (any index for absolute rows), source; float arrays grade in [0, 1] and weight.
    Full-batch Adam for `cfg.steps`, its learning rate on a cosine down to 0; seeded, so the same data and recipe
    give the same head."""
    head_cfg = HeadConfig(
        dim=x.shape[1] - cfg.length_input,
        models=list(models),
        sources=list(sources),
        schemes=list(schemes),
        factors=cfg.factors,
        length_input=cfg.length_input,
        reference=list(cfg.reference),
    )
    if cfg.length_input:
        log_len = np.log(np.clip(x[:, -1], 1.0, None))
        head_cfg.length_mean, head_cfg.length_std = float(log_len.mean()), float(log_len.std() or 1.0)
        head_cfg.length_range = (float(log_len.min()), float(log_len.max()))
    rng = torch.Generator().manual_seed(cfg.seed)  # the fit's own: no process-wide seed is touched
    head = QualityHead(head_cfg)
    nn.init.zeros_(head.difficulty.weight)  # only absolute grades move it: a versus-only fit keeps every prompt alike
    nn.init.zeros_(head.difficulty.bias)
    nn.init.normal_(head.traits.weight, std=0.01, generator=rng)
    nn.init.normal_(head.loading, std=0.01, generator=rng)
    head.graded[torch.as_tensor(np.array(obs["source"])), torch.as_tensor(np.array(obs["model"]))] = 1.0
    xt = torch.from_numpy(x.astype(np.float32))
    idx = {k: torch.from_numpy(np.array(obs[k], dtype=np.int64)) for k in ("prompt", "model", "opponent", "source")}
    y = torch.from_numpy(np.array(obs["grade"], dtype=np.float32))
    w = torch.from_numpy(np.array(obs["weight"], dtype=np.float32))
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)  # ends at rest, not mid-oscillation
    for step in range(cfg.steps):
        logits = head.grade_logits(xt, idx["prompt"], idx["model"], idx["opponent"], idx["source"])
        loss = (nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).mean()
        reg = (
            cfg.l2 * (head.traits.weight.square().sum() + head.loading.square().sum() + head.offset.square().sum())
            + cfg.l2_difficulty * head.difficulty.weight.square().sum()
        )
        opt.zero_grad()
        (loss + reg).backward()
        opt.step()
        schedule.step()
        on_step(step, float(loss.detach()))
    with torch.no_grad():
        refs = [sources.index(s) for s in cfg.reference if s in sources and schemes[sources.index(s)] == "absolute"]
        if not refs:
            refs = [i for i, s in enumerate(schemes) if s == "absolute"]
        if refs:
            head.link.copy_(torch.stack([head.log_scale.exp()[refs].mean(), head.bias[refs].mean()]))
        d = head.latent(xt)[1]
        head.cfg.difficulty_mean, head.cfg.difficulty_std = float(d.mean()), float(d.std() or 1.0)
    return head.eval()


class FusedRouter(nn.Module):
    """Token ids -> (quality (n, models), difficulty (n,), embedding (n, dim)): transformer, mean pooling, L2
    normalisation (the sentence embedding, also returned), the prompt's length (summed from `piece_lengths`, see
    embed.piece_chars) and the head."""

    def __init__(self, transformer: nn.Module, head: QualityHead, piece_lengths: np.ndarray):
        super().__init__()
        self.transformer, self.head = transformer, head
        self.register_buffer("piece_lengths", torch.from_numpy(np.asarray(piece_lengths, dtype=np.float32)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        hidden = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        embedding = nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        x = embedding
        if self.head.cfg.length_input:
            chars = (self.piece_lengths[input_ids] * attention_mask.to(hidden.dtype)).sum(1, keepdim=True)
            x = torch.cat([x, chars], dim=-1)
        return (*self.head(x), embedding)
