"""A monitor of representation quality during pretraining (``--monitor-every N``).

Every N epochs and after the last, rank 0 measures the weighted kNN accuracy of the encoder's
backbone features (``knn_predict``: k = 200 nearest by cosine similarity, each voting for its
label with weight exp(similarity / 0.1), as the kNN monitors of InstDisc and solo-learn do),
with the training split as the bank and the test split as the queries:

- ``knn_acc``: of the clean test images;
- ``knn_pgd_acc``: of test images under a feature-space PGD (3 L-inf steps of eps/2 from a
  uniform random start in the eps-ball, at the run's eps, 8/255 for a method without one) that
  pushes each image's feature away from its clean feature (it lowers their cosine similarity;
  no label is used). The bank stays clean.

The encoder is the network the run saves (``method.export``), in eval mode, through the BN set
finetuning starts from ("pgd", or its only set); its training mode is restored after. The
random start comes from its own generator (``epoch_generator``), so monitoring changes neither
the training's random stream nor its weights: a monitored run trains what an unmonitored one does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks.pgd import iterative_attack
from ..checkpoint import unwrap
from ..data.augment import to_float
from ..data.registry import ImageData, load_dataset
from ..device import autocast
from .run import epoch_generator

K, TEMPERATURE = 200, 0.1
PGD_STEPS, DEFAULT_EPS = 3, 8 / 255
BATCH = 256


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = K, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The weighted kNN vote (N,) of ``query`` (N, D) among ``bank`` (M, D) labelled
    ``bank_labels`` (M,): the ``k`` most cosine-similar bank rows (all if fewer) vote for their
    label with weight exp(similarity / temperature); the heaviest class wins."""
    bank = F.normalize(bank.float(), dim=1)
    preds = []
    for chunk in query.split(BATCH):
        sim, idx = (F.normalize(chunk.float(), dim=1) @ bank.T).topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        preds.append(votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp()).argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=query.device)


def away_from_clean(feat: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """The feature-space attack's objective: minus the cosine similarity to the clean features."""
    return -F.cosine_similarity(feat.float(), clean, dim=1).sum()


class Monitor:
    """kNN accuracy of an encoder, clean and under the feature-space PGD (see the top)."""

    def __init__(self, train: ImageData, test: ImageData, *, every: int, epochs: int, eps: float | None, seed: int,
                 precision: str = "fp32"):
        self.train, self.test, self.every, self.epochs = train, test, every, epochs
        self.eps, self.seed, self.precision = eps or DEFAULT_EPS, seed, precision

    def __call__(self, model: torch.nn.Module, done: int) -> dict:
        """The monitor's metrics after ``done`` epochs when it is due, else {}."""
        if done % self.every and done != self.epochs:
            return {}
        return self.measure(model, epoch_generator(self.seed, done, self.test.images.device))

    def measure(self, model: torch.nn.Module, gen: torch.Generator) -> dict:
        net = unwrap(model)
        bn = "pgd" if "pgd" in net.config.bn_sets else net.config.bn_sets[0]
        device = self.test.images.device

        def features(x: torch.Tensor) -> torch.Tensor:
            with autocast(self.precision, device):
                return net.features(x, bn).float()

        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                bank = torch.cat([features(to_float(x)) for x in self.train.images.split(BATCH)])
            clean, adv = [], []
            for x in self.test.images.split(BATCH):
                x = to_float(x)
                with torch.no_grad():
                    clean.append(features(x))
                x_adv = iterative_attack(features, x, clean[-1], self.eps, PGD_STEPS, self.eps / 2,
                                         loss_fn=away_from_clean, gen=gen)
                with torch.no_grad():
                    adv.append(features(x_adv))
        finally:
            net.train(was_training)
        labels, n = self.test.labels, max(len(self.test), 1)

        def accuracy(feats: list[torch.Tensor]) -> float:
            pred = knn_predict(torch.cat(feats), bank, self.train.labels, self.train.num_classes)
            return float((pred == labels).sum()) / n

        return {"knn_acc": accuracy(clean), "knn_pgd_acc": accuracy(adv)}


def monitor_of(settings, train: ImageData, eps: float | None, ctx, precision: str) -> Monitor | None:
    """The run's monitor on rank 0 when ``--monitor-every`` is on (its test split loaded now,
    before training: a missing split stops the run before it starts), else None."""
    if not settings.monitor_every or not ctx.is_main:
        return None
    test = load_dataset(settings.dataset, "test", data_dir=settings.data_dir, download=settings.download,
                        limit=settings.limit, image_size=settings.image_size).to(train.images.device)
    return Monitor(train, test, every=settings.monitor_every, epochs=settings.epochs, eps=eps, seed=settings.seed,
                   precision=precision)
