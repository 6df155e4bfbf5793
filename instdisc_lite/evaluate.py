"""Chapter 6 — evaluating a representation: feature extraction, weighted kNN, linear probe.

Weighted kNN (paper Sec. 3.4): for a test feature f, take the k most cosine-similar training
features s_i, weight each by ``alpha_i = exp(s_i / tau)``, and predict the class with the largest
summed weight. k = 200, tau = 0.07 in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # plain text bars: no ipywidgets needed, no warning on the book pages

from . import distributed


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader,
    device: torch.device | str | None = None,
    transform: nn.Module | None = None,
    progress: bool = False,
    gather: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``loader`` (yielding ``(images, labels, ...)``).

    Returns ``(features (N, d) float32 on CPU, labels (N,) long)``. ``transform`` is applied to each
    batch on the device (e.g. :class:`~instdisc_lite.data.Normalize` for uint8 tensor batches).

    One process: the rows are in loader order. Distributed (``gather``, the default when a process
    group is up): each rank's loader yields only its shard as ``(images, labels, indices)``, with
    ``indices`` the dataset positions, and the shards of all ranks partition ``0..N-1``. Features,
    labels and indices of every rank are gathered and the rows sorted by index, so every rank returns
    the same ``(N, d)`` and ``(N,)``, in dataset order. ``gather=False`` keeps this rank's rows only.
    """
    gather = distributed.is_distributed() if gather is None else gather
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    feats, labels, indices = [], [], []
    for batch in tqdm(loader, desc="features", disable=not progress, leave=False):
        images, targets = batch[0].to(device, non_blocking=True), batch[1]
        if transform is not None:
            images = transform(images)
        feats.append(model(images).float().cpu())
        labels.append(torch.as_tensor(targets))
        if gather:
            if len(batch) < 3 or batch[2] is None:
                raise ValueError("a sharded extract_features needs a loader yielding (images, labels, indices)")
            indices.append(torch.as_tensor(batch[2]))
    model.train(was_training)
    features, labels = torch.cat(feats), torch.cat(labels).long()
    if not gather:
        return features, labels
    return gather_by_index(features, labels, torch.cat(indices).long())


def gather_by_index(
    features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(B_r, d)`` features and ``(B_r,)`` labels, as ``(N, d)`` and ``(N,)`` sorted by ``indices``."""
    features = distributed.all_gather_varlen(features)
    labels = distributed.all_gather_varlen(labels)
    indices = distributed.all_gather_varlen(indices)
    sorted_idx, order = indices.sort()
    # A sampler that pads its shards (DistributedSampler repeats items to even them out) or drops some
    # would silently weight or miss images in the kNN: refuse it. Every rank sees the same gathered
    # indices, so every rank raises together and none is left waiting.
    if not torch.equal(sorted_idx, torch.arange(indices.numel())):
        raise ValueError(
            f"the shards of the {distributed.world_size()} ranks must partition the dataset positions 0..N-1 "
            f"exactly (got {indices.numel()} indices, {sorted_idx.unique().numel()} distinct)"
        )
    return features[order], labels[order]


@torch.no_grad()
def knn_neighbours(
    train_features: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    bank_chunk: int = 262_144,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities and indices of ``queries`` (Q, d) among ``train_features`` (N, d).

    The bank is scanned in chunks with a running top-k, so memory is ``Q x (bank_chunk + k)`` no
    matter how large N is.
    """
    k = min(k, train_features.shape[0])
    best_sim = torch.full((queries.shape[0], 0), float("-inf"), device=queries.device)
    best_idx = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, train_features.shape[0], bank_chunk):
        chunk = train_features[start : start + bank_chunk].to(queries.device, queries.dtype)
        sim = queries @ chunk.T
        kk = min(k, sim.shape[1])
        s, i = sim.topk(kk, dim=1)
        best_sim = torch.cat([best_sim, s], dim=1)
        best_idx = torch.cat([best_idx, i + start], dim=1)
        if best_sim.shape[1] > k:
            best_sim, pos = best_sim.topk(k, dim=1)
            best_idx = best_idx.gather(1, pos)
    return best_sim, best_idx


@torch.no_grad()
def weighted_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.07,
    num_classes: int | None = None,
    query_chunk: int = 256,
    bank_chunk: int = 262_144,
    device: torch.device | str | None = None,
    shard: bool | None = None,
) -> dict[str, float]:
    """Weighted kNN top-1 / top-5 accuracy (in %) of ``test_features`` against ``train_features``.

    ``train_features`` (N, d), ``train_labels`` (N,), ``test_features`` (Q, d), ``test_labels`` (Q,).
    Features are L2-normalised here, so the dot product is the cosine similarity. Queries are
    processed ``query_chunk`` at a time and the bank ``bank_chunk`` rows at a time: 50,000 queries
    against 1.28 M rows of 128-d need ``query_chunk * bank_chunk * 4`` bytes of scores (256 MB by
    default) plus the features themselves.

    ``shard`` (default: when distributed) splits the queries into one contiguous slice per rank; each
    rank scores its slice and the correct counts are summed over ranks, so the result is the same on
    every rank and equal to the one-process one, for 1 / world_size of the work. Every rank must pass
    the same features and labels (as :func:`extract_features` returns them).
    """
    shard = distributed.is_distributed() if shard is None else shard
    device = torch.device(device) if device is not None else test_features.device
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.long().to(device)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if train_features.shape[0] <= bank_chunk:
        train_features = train_features.to(device)  # small bank: move once, not per chunk
    n = test_features.shape[0]
    first, last = 0, n
    if shard:
        r, w = distributed.rank(), distributed.world_size()
        first, last = n * r // w, n * (r + 1) // w
    correct1 = correct5 = 0
    for start in range(first, last, query_chunk):
        stop = min(start + query_chunk, last)
        q = test_features[start:stop].to(device)
        sim, idx = knn_neighbours(train_features, q, k, bank_chunk)
        weights = (sim / temperature).exp()  # alpha_i = exp(s_i / tau)
        votes = torch.zeros(q.shape[0], num_classes, device=device)
        votes.scatter_add_(1, train_labels[idx], weights)
        top = votes.topk(min(5, num_classes), dim=1).indices.cpu()
        target = test_labels[start:stop].long().cpu()
        correct1 += (top[:, 0] == target).sum().item()
        correct5 += (top == target[:, None]).any(dim=1).sum().item()
    if shard:
        correct1, correct5 = distributed.all_reduce_sum(torch.tensor([correct1, correct5])).tolist()
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n}


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 1e-4,
    batch_size: int = 1024,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (in %) of a linear classifier trained on frozen features.

    Features are standardised with the training mean and std; the classifier is trained with SGD
    (momentum 0.9, cosine-decayed lr) and cross-entropy. The paper's CIFAR-10 Table 1 trains a linear
    SVM on the 128-d feature (its ImageNet results use conv features); a softmax probe is the common stand-in.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    mu, sd = train_features.mean(0), train_features.std(0) + 1e-6
    xtr = ((train_features - mu) / sd).to(device)
    xte = ((test_features - mu) / sd).to(device)
    ytr, yte = train_labels.long().to(device), test_labels.long().to(device)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    probe = nn.Linear(xtr.shape[1], num_classes).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe.reset_parameters()
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * ((xtr.shape[0] + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=g).to(device)
        for start in range(0, xtr.shape[0], batch_size):
            b = perm[start : start + batch_size]
            loss = F.cross_entropy(probe(xtr[b]), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        acc = (probe(xte).argmax(1) == yte).float().mean().item()
    return {"top1": 100.0 * acc}
