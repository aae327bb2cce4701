"""What a method author needs, from one module: ``from advcl_cli.api import ...``.

A pretraining method is a subclass of ``Method`` (its contract: ``advcl_cli.methods.base``)
registered under the ``advcl.methods`` entry point group; the README's "Writing a method" is a
complete one. This module re-exports, and is the documented surface:

- the method API: ``Method``, ``TrainSettings`` (the optimiser and schedule every method has),
  ``PGDSettings`` (eps, pgd_steps, pgd_step_size), ``ContrastiveSettings``, ``CosineSettings``,
  ``option`` (one setting: its default, help text and flag) and ``with_defaults`` (a settings
  model with other defaults);
- views: ``to_float`` (uint8 batch to [0, 1]), ``simclr_view`` with ``ViewSpec`` (its
  augmentation), ``crop_flip_view``, ``high_frequency``;
- the PGD loop: ``pgd_ascent`` over any number of inputs, its start ``uniform_noise``, and
  ``project`` (onto the eps-ball and [0, 1]);
- losses (pure functions): ``nt_xent``, ``supcon_loss``, ``pseudo_label_ce``;
- distributed helpers, each a no-op in one process: ``DistContext``, ``local_slice`` (this
  rank's part of a global batch), ``all_gather_with_grad`` (every rank's rows, with gradients);
- ``unwrap`` (the network inside a compiled model) and the learning-rate schedules
  ``WarmupCosine``, ``CosineAnnealing``, ``MultiStep`` for a method's own ``schedule()``.

Importing it imports torch.
"""

from __future__ import annotations

from .attacks.pgd import pgd_ascent, project, uniform_noise
from .checkpoint import unwrap
from .data.augment import ViewSpec, crop_flip_view, high_frequency, simclr_view, to_float
from .distributed import DistContext, all_gather_with_grad, local_slice
from .methods.base import ContrastiveSettings, CosineSettings, Method, PGDSettings, TrainSettings
from .methods.losses import nt_xent, pseudo_label_ce, supcon_loss
from .optim import CosineAnnealing, MultiStep, WarmupCosine
from .settings import option, with_defaults

__all__ = [
    "ContrastiveSettings", "CosineAnnealing", "CosineSettings", "DistContext", "Method", "MultiStep", "PGDSettings",
    "TrainSettings", "ViewSpec", "WarmupCosine", "all_gather_with_grad", "crop_flip_view", "high_frequency",
    "local_slice", "nt_xent", "option", "pgd_ascent", "project", "pseudo_label_ce", "simclr_view", "supcon_loss",
    "to_float", "uniform_noise", "unwrap", "with_defaults",
]
