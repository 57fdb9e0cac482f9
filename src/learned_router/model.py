"""The torch side of a router: the head on top of the encoder, its training loop, and the fused encoder+head."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

HEAD_FILE = "head.pt"
MIN_GAIN = 1e-4  # a validation AUC gain below this is float noise, not a better epoch


@dataclass
class HeadConfig:
    dim: int = 384
    hidden: int = 256
    dropout: float = 0.1
    outputs: int = 1  # 1: P(weak passes); K: P(each of K models passes)


class Head(nn.Module):
    """An MLP from a unit-normalised sentence embedding to the logit of P(weak answer passes) (or K such logits)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.outputs))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        out = self.net(emb)
        return out.squeeze(-1) if self.cfg.outputs == 1 else out

    def save(self, folder: Path) -> None:
        torch.save({"config": asdict(self.cfg), "state": self.state_dict()}, Path(folder) / HEAD_FILE)

    @classmethod
    def load(cls, folder: Path) -> "Head":
        blob = torch.load(Path(folder) / HEAD_FILE, map_location="cpu", weights_only=True)
        head = cls(HeadConfig(**blob["config"]))
        head.load_state_dict(blob["state"])
        return head.eval()

    @torch.no_grad()
    def predict(self, emb: np.ndarray) -> np.ndarray:
        self.eval()
        return torch.sigmoid(self(torch.from_numpy(np.asarray(emb, dtype=np.float32)))).numpy()


@dataclass
class FitConfig:
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    patience: int = 15
    seed: int = 0


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
) -> tuple[Head, dict]:
    """Weighted BCE with AdamW; keeps the best validation epoch and stops after `patience` without gain.

    y is (n,) 0/1 labels, selected on validation AUC (loss if validation has one class), or (n, K) targets in [0, 1] with NaN for missing grades,
    selected on validation loss. Seeded before the head is built, so the same data and config give the same head."""
    seed_everything(cfg.seed)
    head = Head(head_cfg)
    multi = y_train.ndim == 2
    xt, yt = torch.from_numpy(x_train.astype(np.float32)), torch.from_numpy(y_train.astype(np.float32))
    wt = torch.from_numpy((w_train / w_train.mean()).astype(np.float32))
    xv, yv = torch.from_numpy(x_val.astype(np.float32)), torch.from_numpy(y_val.astype(np.float32))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    best = {"select": -np.inf, "epoch": -1}
    best_state = copy.deepcopy(head.state_dict())
    bar = tqdm(range(cfg.epochs), desc="training head", unit="epoch", disable=None)  # no bar when not a terminal
    for epoch in bar:
        head.train()
        perm, total = torch.randperm(len(xt), generator=gen), 0.0
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = masked_bce(head(xt[idx]), yt[idx], wt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        head.eval()
        with torch.no_grad():
            logits_val = head(xv)
        m = {"train_loss": total / len(xt), "val_loss": float(masked_bce(logits_val, yv, torch.ones(len(yv))))}
        if not multi:
            m["val_auc"] = auc(y_val, torch.sigmoid(logits_val).numpy())
        on_epoch(epoch, m)
        bar.set_postfix(loss=f"{m['train_loss']:.4f}", val=f"{m.get('val_auc', m['val_loss']):.4f}")
        select = m["val_auc"] if not multi and m["val_auc"] == m["val_auc"] else -m["val_loss"]  # one-class val: loss
        if select > best["select"] + MIN_GAIN:
            best, best_state = {**m, "select": select, "epoch": epoch}, copy.deepcopy(head.state_dict())
        elif epoch - best["epoch"] >= cfg.patience:
            break
    head.load_state_dict(best_state)
    head.eval()
    key = "val_loss" if multi else "val_auc"
    return head, {"best_epoch": best["epoch"], f"best_{key}": best.get(key, float("nan")), "epochs_run": epoch + 1}


class FusedRouter(nn.Module):
    """Token ids -> P(weak passes) (or K models' P(pass)): transformer, mean pooling, L2 normalisation and the head."""

    def __init__(self, transformer: nn.Module, head: Head):
        super().__init__()
        self.transformer, self.head = transformer, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.sigmoid(self.head(nn.functional.normalize(emb, dim=-1)))


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

    def embed(texts):
        feats = st_model.tokenize(texts)
        return nn.functional.normalize(st_model(feats)["sentence_embedding"], dim=-1)

    @torch.no_grad()
    def predict(texts):
        st_model.eval(), head.eval()
        return np.concatenate([torch.sigmoid(head(embed(texts[i : i + 64]))).numpy() for i in range(0, len(texts), 64)])

    best = {"val_auc": auc(y_val, predict(val_texts)), "epoch": -1}  # epoch -1: the frozen-encoder head
    best_states = (copy.deepcopy(st_model.state_dict()), copy.deepcopy(head.state_dict()))
    for epoch in range(epochs):
        st_model.train(), head.train()
        perm, total = torch.randperm(len(train_texts), generator=gen).tolist(), 0.0
        for i in tqdm(range(0, len(perm), batch_size), desc=f"fine-tuning epoch {epoch + 1}/{epochs}", unit="batch"):
            idx = perm[i : i + batch_size]
            logits = head(embed([train_texts[j] for j in idx]))
            loss = masked_bce(logits, y[idx], w[idx])
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
    return {"finetune_best_epoch": best["epoch"], "finetune_best_val_auc": best["val_auc"]}


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
