"""The toy task's judge: a small timm classifier (built from its config, no pretrained weights) that says
which class a picture shows, and whose pooled features give a toy FID against real pictures.

Saved as `judge.json` (timm model name, class names, picture size, the real pictures' feature mean
and covariance) plus `judge.safetensors`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmopd.config import ConfigError
from mmopd.run.schedule import warmup_cosine
from modalities.image_tokens.shapes import to_tensor

JUDGE_FILE, WEIGHTS_FILE = "judge.json", "judge.safetensors"
ARCHITECTURE = "test_resnet"  # timm's smallest ResNet (~0.4M parameters, 96 pooled features)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1) + Tr(Σ2) − 2 Tr((Σ1 Σ2)^½): the FID formula on any features.

    Tr((Σ1 Σ2)^½) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    Σ1^½ Σ2 Σ1^½ (same spectrum as Σ1 Σ2), so singular covariances (fewer pictures than features)
    need no special care.
    """
    root1 = _psd_sqrt(sigma1)
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ sigma2 @ root1).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def feature_stats(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[N, F] -> mean [F] and covariance [F, F] (float64)."""
    x = features.double().cpu().numpy()
    return x.mean(0), np.cov(x, rowvar=False)


class Judge:
    def __init__(self, model: nn.Module, class_names: list[str], image_size: int,
                 reference: tuple[np.ndarray, np.ndarray] | None = None):
        self.model = model.eval()
        self.class_names = list(class_names)
        self.image_size = image_size
        self.reference = reference  # feature mean and covariance of real pictures

    @classmethod
    def build(cls, class_names: list[str], image_size: int) -> "Judge":
        return cls(timm.create_model(ARCHITECTURE, pretrained=False, num_classes=len(class_names)), class_names,
                   image_size)

    def _pixels(self, images: list[Image.Image]) -> Tensor:
        sized = [im if im.size == (self.image_size, self.image_size) else
                 im.resize((self.image_size, self.image_size), Image.BILINEAR) for im in images]
        return to_tensor(sized)  # [N, 3, S, S]

    @torch.no_grad()
    def features_and_logits(self, images: list[Image.Image], batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """Pooled features [N, F] and class logits [N, C]."""
        self.model.eval()
        feats, logits = [], []
        for start in range(0, len(images), batch_size):
            pooled = self.model.forward_head(self.model.forward_features(self._pixels(images[start:start + batch_size])),
                                             pre_logits=True)
            feats.append(pooled)
            logits.append(self.model.get_classifier()(pooled))
        return torch.cat(feats), torch.cat(logits)

    def accuracy_and_fid(self, images: list[Image.Image], labels: list[int]) -> dict[str, float]:
        """Whether each picture shows its asked class, and the Fréchet distance of the set to real pictures."""
        if self.reference is None:
            raise ValueError("this judge has no reference statistics of real pictures; fit it with fit() first")
        feats, logits = self.features_and_logits(images)
        hits = (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()
        fid = frechet_distance(*feature_stats(feats), *self.reference) if len(images) > 1 else math.nan
        return {"classifier_accuracy": hits, "fid": fid}

    def fit(self, images: list[Image.Image], labels: list[int], steps: int, batch_size: int = 64, lr: float = 3e-3,
            seed: int = 0) -> list[float]:
        """Train on labelled real pictures (AdamW, cosine decay, random flips), then store their feature
        statistics as the FID reference."""
        pixels, targets = self._pixels(images), torch.tensor(labels)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(0, steps))
        self.model.train()
        losses = []
        for _ in range(steps):
            idx = torch.randint(len(pixels), (batch_size,), generator=gen)
            x = pixels[idx]
            flip = torch.rand(batch_size, generator=gen) < 0.5  # shapes stay themselves when mirrored
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(self.model(x), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        self.model.eval()
        self.reference = feature_stats(self.features_and_logits(images)[0])
        return losses

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(path / WEIGHTS_FILE))
        mu, sigma = self.reference if self.reference is not None else (None, None)
        meta = {"architecture": ARCHITECTURE, "class_names": self.class_names, "image_size": self.image_size,
                "reference_mean": None if mu is None else mu.tolist(),
                "reference_cov": None if sigma is None else sigma.tolist()}
        (path / JUDGE_FILE).write_text(json.dumps(meta) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Judge":
        """The judge saved in directory `path`; anything else there is a ConfigError naming data.judge."""
        path = Path(path)
        where = f"data.judge={path}"
        if not (path / JUDGE_FILE).is_file():
            raise ConfigError(f"{where} holds no {JUDGE_FILE}; point data.judge at a directory written by "
                              "`mmopd toy image` (a timm classifier with its class names)")
        try:
            meta = json.loads((path / JUDGE_FILE).read_text())
            model = timm.create_model(meta["architecture"], pretrained=False, num_classes=len(meta["class_names"]))
            model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
            reference = None if meta["reference_mean"] is None else \
                (np.array(meta["reference_mean"]), np.array(meta["reference_cov"]))
            return cls(model, meta["class_names"], meta["image_size"], reference)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:  # not a judge's
            raise ConfigError(f"{where} is not a readable judge ({type(err).__name__}: {str(err)[:200]}); point "
                              "it at a directory written by `mmopd toy image`") from err
