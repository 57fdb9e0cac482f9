"""The torch side of a router: the head on top of the encoder, its training loop, and the fused encoder+head."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from .embed import piece_bags, piece_chars

HEAD_FILE = "head.pt"
MIN_GAIN = 1e-4  # a validation AUC gain below this is float noise, not a better epoch
KNN_GAMMA = 10.0  # similarity weighting, as the kNN baseline's (evals.baselines.knn_scores)


@dataclass
class HeadConfig:
    dim: int = 384
    hidden: int = 256  # 0: no MLP; the lexical experts are the whole head
    dropout: float = 0.1
    outputs: int = 1  # 1: P(weak passes); K: P(each of K models passes)
    length_input: bool = False  # the input's last column is the prompt's length in characters (see Encoder.features)
    length_mean: float = 0.0  # mean and std of log(length) over the training rows, set by fit_head
    length_std: float = 1.0
    length_range: tuple[float, float] = (0.0, 10.0)  # log(length) is clipped to the training rows' range: no extrapolation
    lexical_c: float = 0.0  # > 0: add lexical experts (lexical.py) fitted with this inverse L2 strength (one output only)
    sources: int = 0  # the lexical experts' count and the vocabulary they weigh, set when they are attached
    vocab: int = 0
    neighbours: int = 0  # > 0: add a kNN over the training rows' embeddings with this k (one output only)
    memory: int = 0  # the kNN's training rows, set when they are attached


class Neighbours(nn.Module):
    """Similarity-weighted kNN over the training rows' embeddings (RouteLLM's SW ranking): the logit of the mean
    target of the k most cosine-similar rows, weighted by exp(KNN_GAMMA * similarity) and the rows' weights, times
    `scale` (set by `calibrate`)."""

    def __init__(self, rows: int, dim: int, k: int):
        super().__init__()
        self.k = min(k, rows)
        self.register_buffer("emb", torch.zeros(rows, dim))  # fp16 values (attach_neighbours), saved as fp16
        self.register_buffer("target", torch.zeros(rows))
        self.register_buffer("weight", torch.ones(rows))
        self.register_buffer("scale", torch.zeros(()))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        sim, idx = (emb @ self.emb.T).topk(self.k, dim=-1)  # sorted: the first is the most similar
        w = torch.exp(KNN_GAMMA * (sim - sim[:, :1])) * self.weight[idx]
        p = ((w * self.target[idx]).sum(-1) / w.sum(-1)).clamp(1e-4, 1 - 1e-4)
        return torch.log(p / (1 - p)).unsqueeze(-1)


class Head(nn.Module):
    """An MLP from a unit-normalised sentence embedding (and optionally the prompt's length) to the logit of
    P(weak answer passes) (or K such logits); optionally plus, or only (`hidden` 0), lexical experts on the prompt's
    word-piece bag and the same input (see lexical.py); optionally plus a kNN over the training rows (`Neighbours`)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        d_in = cfg.dim + cfg.length_input
        if cfg.hidden:
            self.net = nn.Sequential(nn.Linear(d_in, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.outputs))
        if cfg.sources:
            self.gate = nn.Linear(cfg.dim, cfg.sources)
            self.register_buffer("lexicon", torch.zeros(cfg.vocab, cfg.sources))
            self.register_buffer("expert_weight", torch.zeros(d_in, cfg.sources))
            self.register_buffer("expert_bias", torch.zeros(cfg.sources))
        if cfg.memory:
            self.neighbours = Neighbours(cfg.memory, cfg.dim, cfg.neighbours)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The rows as the layers see them: the standardised log length in place of the raw character count."""
        if not self.cfg.length_input:
            return x
        lo, hi = self.cfg.length_range
        z = (torch.log(x[:, -1:].clamp(min=1.0)).clamp(lo, hi) - self.cfg.length_mean) / self.cfg.length_std
        return torch.cat([x[:, :-1], z], dim=-1)

    def forward(self, x: torch.Tensor, bag=None) -> torch.Tensor:
        """`bag`: the prompts' word-piece bags (`embed.piece_bags`; a dense tensor or scipy CSR rows), needed when the
        head has lexical experts."""
        out = self.main(x, bag)
        if self.cfg.memory:
            out = out + self.neighbours.scale * self.neighbours(x[:, : self.cfg.dim]).squeeze(-1)
        return out

    def main(self, x: torch.Tensor, bag=None) -> torch.Tensor:
        """The logit of the MLP and the experts, without the kNN."""
        x = self.inputs(x)
        out = self.net(x) if self.cfg.hidden else 0.0  # no MLP: the experts alone (fit_head attaches them)
        if self.cfg.sources:
            if bag is None:
                raise ValueError("this head has lexical experts: pass the prompts' word-piece bags")
            words = bag @ self.lexicon if isinstance(bag, torch.Tensor) else torch.from_numpy((bag @ self.lexicon.numpy()).astype(np.float32))
            experts = words + x @ self.expert_weight + self.expert_bias
            out = out + (torch.softmax(self.gate(x[:, : self.cfg.dim]), dim=-1) * experts).sum(-1, keepdim=True)
        return out.squeeze(-1) if self.cfg.outputs == 1 else out

    @torch.no_grad()
    def attach_lexical(self, lexicon: np.ndarray, input_weight: np.ndarray, bias: np.ndarray, gate_weight: np.ndarray,
                       gate_bias: np.ndarray) -> None:
        """Add lexical experts (see lexical.fit_lexical) to a one-output head."""
        self.cfg = replace(self.cfg, vocab=lexicon.shape[0], sources=lexicon.shape[1])
        self.gate = nn.Linear(self.cfg.dim, self.cfg.sources)
        self.gate.weight.copy_(torch.from_numpy(gate_weight))
        self.gate.bias.copy_(torch.from_numpy(gate_bias))
        for name, value in (("lexicon", lexicon), ("expert_weight", input_weight), ("expert_bias", bias)):
            self.register_buffer(name, torch.from_numpy(np.asarray(value, dtype=np.float32)))

    @torch.no_grad()
    def attach_neighbours(self, emb: np.ndarray, target: np.ndarray, weight: np.ndarray) -> None:
        """Add a kNN over these training rows (unit embeddings, targets in [0, 1], row weights); `calibrate` sets its
        scale in the head's logit."""
        self.cfg = replace(self.cfg, memory=len(emb))
        self.neighbours = Neighbours(len(emb), self.cfg.dim, self.cfg.neighbours)
        emb = np.asarray(emb, dtype=np.float16)  # half the bytes in head.pt; the similarities as good
        for name, value in (("emb", emb), ("target", target), ("weight", weight / weight.mean())):
            getattr(self.neighbours, name).copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))

    def save(self, folder: Path) -> None:
        state = self.state_dict()
        if self.cfg.memory:  # fp16 values already: stored losslessly in half the bytes
            state["neighbours.emb"] = state["neighbours.emb"].half()
        torch.save({"config": asdict(self.cfg), "state": state}, Path(folder) / HEAD_FILE)

    @classmethod
    def load(cls, folder: Path) -> "Head":
        blob = torch.load(Path(folder) / HEAD_FILE, map_location="cpu", weights_only=True)
        head = cls(HeadConfig(**blob["config"]))
        if head.cfg.sources:  # heads from before the experts weighed the input: words only
            blob["state"] = {"expert_weight": head.expert_weight, "expert_bias": head.expert_bias, **blob["state"]}
        head.load_state_dict(blob["state"])
        return head.eval()

    @torch.no_grad()
    def predict(self, emb: np.ndarray, bags=None) -> np.ndarray:
        self.eval()
        return torch.sigmoid(self(torch.from_numpy(np.asarray(emb, dtype=np.float32)), bags)).numpy()


@dataclass
class FitConfig:
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    patience: int = 15
    seed: int = 0
    source_offsets: bool = False  # learn a per-source bias in training (folded into the head's bias afterwards)


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def masked_bce(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted BCE over the targets that are present (NaN = that model has no grade for that prompt)."""
    known = ~torch.isnan(y)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none")
    w = w.unsqueeze(-1) if loss.dim() == 2 else w
    return (loss * w * known).sum() / known.sum().clamp(min=1)


def fit_head(
    head_cfg: HeadConfig,
    x_train: np.ndarray, y_train: np.ndarray, w_train: np.ndarray,
    x_val: np.ndarray, y_val: np.ndarray,
    cfg: FitConfig,
    on_epoch: Callable[[int, dict], None] = lambda epoch, m: None,
    sources: tuple[np.ndarray, np.ndarray] | None = None,
    bags: tuple | None = None,
) -> tuple[Head, dict]:
    """Fit a head: its MLP (unless `hidden` is 0), then its lexical experts (with `lexical_c`), then calibration.

    y_train is (n,) targets in [0, 1] (the labels, or soft targets such as a tie's 0.5) and y_val the 0/1 labels; or
    both are (n, K) targets in [0, 1] with NaN for missing grades. Seeded before the head is built, so the same data
    and config give the same head. The head's input width and output count come from the data (`head_cfg.dim` and
    `.outputs` are overridden).

    With `head_cfg.lexical_c` (one output only), `sources` and `bags` give the train and validation rows' sources (int
    ids) and word-piece bags: lexical experts per source are fitted and attached to the head (see lexical.py). With
    `head_cfg.neighbours` (one output only), the training rows and their targets, centred per source when `sources`
    are given (lexical.source_centred), become a kNN's memory (the kNN baseline of evals.baselines, on targets rather
    than labels: a tie's 0.5 keeps the kNN's logit moderate, and int8's small shifts of the embedding from swinging it). The head is then Platt-scaled
    on validation, the kNN's logit getting its own weight. For the MLP's training, see `train_mlp`."""
    lexical = bool(head_cfg.lexical_c) and y_train.ndim == 1
    if head_cfg.neighbours and y_train.ndim != 1:
        raise ValueError("fit_head: HeadConfig.neighbours is for one-output heads")
    if lexical and (bags is None or sources is None):
        raise ValueError("fit_head: HeadConfig.lexical_c needs the rows' word-piece bags and sources")
    if not head_cfg.hidden and not lexical:
        raise ValueError("fit_head: a head without an MLP (hidden 0) needs lexical experts (lexical_c > 0, one output)")
    head_cfg = replace(head_cfg, dim=x_train.shape[1] - head_cfg.length_input, outputs=y_train.shape[1] if y_train.ndim == 2 else 1,
                       sources=0, vocab=0, memory=0)
    if head_cfg.length_input:
        log_len = np.log(np.clip(x_train[:, -1], 1.0, None))
        head_cfg = replace(head_cfg, length_mean=float(log_len.mean()), length_std=float(log_len.std() or 1.0),
                           length_range=(float(log_len.min()), float(log_len.max())))
    seed_everything(cfg.seed)
    head = Head(head_cfg)
    info = train_mlp(head, x_train, y_train, w_train, x_val, y_val, cfg, on_epoch, sources) if head_cfg.hidden else {}
    head.eval()
    if lexical:
        from .lexical import fit_lexical

        with torch.no_grad():
            inputs = head.inputs(torch.from_numpy(x_train.astype(np.float32))).numpy()
        head.attach_lexical(**fit_lexical(inputs, head_cfg.dim, bags[0], y_train, w_train, np.asarray(sources[0]),
                                          count_sources(sources), head_cfg.lexical_c))
    if head_cfg.neighbours:
        from .lexical import source_centred

        memory = y_train if sources is None else source_centred(y_train, w_train, np.asarray(sources[0]))
        head.attach_neighbours(x_train[:, : head_cfg.dim], memory, w_train)
    if y_train.ndim == 1 and (soft(y_train) or lexical or head_cfg.neighbours):
        xv = torch.from_numpy(x_val.astype(np.float32))
        with torch.no_grad():
            calibrate(head, head.main(xv, bags[1] if lexical else None), torch.from_numpy(y_val.astype(np.float32)),
                      head.neighbours(xv[:, : head_cfg.dim]).squeeze(-1) if head_cfg.neighbours else None)
    if lexical and not head_cfg.hidden:
        info = {"best_epoch": -1, "best_val_auc": auc(y_val, head.predict(x_val, bags[1])), "epochs_run": 0}
    return head, info


def count_sources(sources: tuple[np.ndarray, np.ndarray]) -> int:
    """Source ids are 0..n-1 over the train and validation rows together."""
    return int(max(np.max(sources[0]), np.max(sources[1], initial=0))) + 1


def train_mlp(head: Head, x_train: np.ndarray, y_train: np.ndarray, w_train: np.ndarray, x_val: np.ndarray,
              y_val: np.ndarray, cfg: FitConfig, on_epoch: Callable[[int, dict], None],
              sources: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """Weighted BCE with AdamW; keeps the best validation epoch (by AUC; by loss for K outputs or a one-class
    validation set) and stops after `patience` without gain.

    With `cfg.source_offsets`, `sources` gives each train and validation row's source: a learned bias per source
    absorbs the sources' different pass rates, so the MLP learns what ranks prompts within a source (a prompt's
    length, say, whose pooled trend is confounded by the sources' base rates). After training the biases' weighted
    mean is folded into the output bias; the head then needs no source at inference."""
    if cfg.source_offsets and sources is None:
        raise ValueError("fit_head: FitConfig.source_offsets needs the rows' sources")
    multi = y_train.ndim == 2
    if not cfg.source_offsets:  # one source whose offset stays 0
        sources = (np.zeros(len(x_train)), np.zeros(len(x_val)))
    n_src = count_sources(sources)
    st, sv = (torch.from_numpy(np.asarray(s, dtype=np.int64)) for s in sources)
    offsets = nn.Parameter(torch.zeros(n_src, head.cfg.outputs) if multi else torch.zeros(n_src))
    xt, yt = torch.from_numpy(x_train.astype(np.float32)), torch.from_numpy(y_train.astype(np.float32))
    wt = torch.from_numpy((w_train / w_train.mean()).astype(np.float32))
    xv, yv = torch.from_numpy(x_val.astype(np.float32)), torch.from_numpy(y_val.astype(np.float32))
    params = [*head.parameters(), offsets] if cfg.source_offsets else head.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    best = {"select": -np.inf, "epoch": -1}
    best_state, best_offsets = copy.deepcopy(head.state_dict()), offsets.detach().clone()
    bar = tqdm(range(cfg.epochs), desc="training head", unit="epoch", disable=None)  # no bar when not a terminal
    for epoch in bar:
        head.train()
        perm, total = torch.randperm(len(xt), generator=gen), 0.0
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = masked_bce(head(xt[idx]) + offsets[st[idx]], yt[idx], wt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        head.eval()
        with torch.no_grad():
            logits_val = head(xv) + offsets[sv]
        m = {"train_loss": total / len(xt), "val_loss": float(masked_bce(logits_val, yv, torch.ones(len(yv))))}
        if not multi:
            m["val_auc"] = auc(y_val, torch.sigmoid(logits_val).numpy())
        on_epoch(epoch, m)
        bar.set_postfix(loss=f"{m['train_loss']:.4f}", val=f"{m.get('val_auc', m['val_loss']):.4f}")
        select = m["val_auc"] if not multi and m["val_auc"] == m["val_auc"] else -m["val_loss"]  # one-class val: loss
        if select > best["select"] + MIN_GAIN:
            best, best_state = {**m, "select": select, "epoch": epoch}, copy.deepcopy(head.state_dict())
            best_offsets = offsets.detach().clone()
        elif epoch - best["epoch"] >= cfg.patience:
            break
    head.load_state_dict(best_state)
    if cfg.source_offsets:  # the bias the head keeps: the offsets' mean over the training rows, by weight
        with torch.no_grad():
            head.net[-1].bias += (best_offsets[st] * (wt.unsqueeze(-1) if multi else wt)).sum(0) / wt.sum()
    key = "val_loss" if multi else "val_auc"
    return {"best_epoch": best["epoch"], f"best_{key}": best.get(key, float("nan")), "epochs_run": epoch + 1}


def soft(y: np.ndarray) -> bool:
    """Soft training targets (a tie's 0.5) move a head's probabilities off the label's: `calibrate` after training
    (as after adding lexical experts)."""
    return not np.isin(y, (0, 1)).all()


@torch.no_grad()
def calibrate(head: Head, logits: torch.Tensor, y_val: torch.Tensor, neighbours: torch.Tensor | None = None) -> None:
    """Platt scaling folded into the head's last layers (the MLP's and the experts'): fit sigmoid(a * logit + b) to
    the validation labels, with a > 0 to keep the ranking; with the kNN's logits, sigmoid(a * logit + c * knn + b),
    c > 0 becoming the kNN's scale. Validation with one class leaves the head as it is."""
    if len(torch.unique(y_val)) < 2:
        return
    parts = logits.unsqueeze(-1) if neighbours is None else torch.stack([logits, neighbours], dim=-1)
    log_a, b = torch.zeros(parts.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_a, b], max_iter=100)

    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            loss = nn.functional.binary_cross_entropy_with_logits(parts @ log_a.exp() + b, y_val)
            loss.backward()
        return loss

    opt.step(closure)
    a = log_a.exp()
    if neighbours is not None:
        head.neighbours.scale.copy_(a[1])
    a = a[0]
    if head.cfg.hidden:
        head.net[-1].weight *= a
        head.net[-1].bias.copy_(a * head.net[-1].bias + b)
    if head.cfg.sources:  # the gate's weights sum to 1: adding b to every expert's bias adds b
        head.lexicon *= a
        head.expert_weight *= a
        head.expert_bias.copy_(a * head.expert_bias + (0 if head.cfg.hidden else b))


class FusedRouter(nn.Module):
    """Token ids -> P(weak passes) (or K models' P(pass)): transformer, mean pooling, L2 normalisation and the head;
    a head with a length input also gets the prompt's length, summed from `piece_lengths` (see embed.piece_chars),
    and one with lexical experts the prompt's word-piece bag, scattered from the ids (see embed.piece_bags)."""

    def __init__(self, transformer: nn.Module, head: Head, piece_lengths: np.ndarray | None = None,
                 piece_mask: np.ndarray | None = None):
        super().__init__()
        self.transformer, self.head = transformer, head
        if head.cfg.length_input:
            self.register_buffer("piece_lengths", torch.from_numpy(np.asarray(piece_lengths, dtype=np.float32)))
        if head.cfg.sources:
            self.register_buffer("piece_mask", torch.from_numpy(np.asarray(piece_mask, dtype=np.float32)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        x = nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        if self.head.cfg.length_input:
            chars = (self.piece_lengths[input_ids] * attention_mask.to(hidden.dtype)).sum(1, keepdim=True)
            x = torch.cat([x, chars], dim=-1)
        bag = None
        if self.head.cfg.sources:  # binary (padding writes 0 at [PAD], a special id), specials masked, L2-normalised
            hot = input_ids.new_zeros((input_ids.shape[0], self.head.cfg.vocab), dtype=hidden.dtype)
            hot = hot.scatter(1, input_ids, attention_mask.to(hidden.dtype)) * self.piece_mask
            bag = hot / hot.sum(1, keepdim=True).clamp(min=1.0).sqrt()
        return torch.sigmoid(self.head(x, bag))


def finetune(
    st_model, head: Head, train_texts: list[str], y_train: np.ndarray, w_train: np.ndarray,
    val_texts: list[str], y_val: np.ndarray, epochs: int, lr: float, batch_size: int, seed: int,
    on_epoch: Callable[[int, dict], None] = lambda epoch, m: None,
) -> dict:
    """End-to-end fine-tuning of encoder + head (slow on CPU); keeps the epoch with the best validation AUC."""
    seed_everything(seed)
    params = [{"params": st_model.parameters(), "lr": lr}, {"params": head.parameters(), "lr": lr * 50}]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    y, w = torch.tensor(y_train, dtype=torch.float32), torch.tensor(w_train / w_train.mean(), dtype=torch.float32)

    def logits(texts):
        feats = st_model.tokenize(texts)
        x = nn.functional.normalize(st_model(feats)["sentence_embedding"], dim=-1)
        if head.cfg.length_input:
            chars = piece_chars(st_model.tokenizer, texts, st_model.max_seq_length)
            x = torch.cat([x, torch.from_numpy(chars).unsqueeze(-1)], dim=-1)
        bag = piece_bags(st_model.tokenizer, texts, st_model.max_seq_length) if head.cfg.sources else None
        return head(x, bag)

    @torch.no_grad()
    def logits_of(texts):
        st_model.eval(), head.eval()
        return torch.cat([logits(texts[i : i + 64]) for i in range(0, len(texts), 64)])

    def predict(texts):
        return torch.sigmoid(logits_of(texts)).numpy()

    best = {"val_auc": auc(y_val, predict(val_texts)), "epoch": -1}  # epoch -1: the frozen-encoder head
    best_states = (copy.deepcopy(st_model.state_dict()), copy.deepcopy(head.state_dict()))
    for epoch in range(epochs):
        st_model.train(), head.train()
        perm, total = torch.randperm(len(train_texts), generator=gen).tolist(), 0.0
        for i in tqdm(range(0, len(perm), batch_size), desc=f"fine-tuning epoch {epoch + 1}/{epochs}", unit="batch"):
            idx = perm[i : i + batch_size]
            loss = masked_bce(logits([train_texts[j] for j in idx]), y[idx], w[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        m = {"train_loss": total / len(perm), "val_auc": auc(y_val, predict(val_texts))}
        on_epoch(epoch, m)
        if m["val_auc"] > best["val_auc"]:
            best = {**m, "epoch": epoch}
            best_states = (copy.deepcopy(st_model.state_dict()), copy.deepcopy(head.state_dict()))
    st_model.load_state_dict(best_states[0])
    head.load_state_dict(best_states[1])
    st_model.eval(), head.eval()
    if soft(y_train):
        calibrate(head, logits_of(val_texts), torch.tensor(y_val, dtype=torch.float32))
    return {"finetune_best_epoch": best["epoch"], "finetune_best_val_auc": best["val_auc"]}


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
