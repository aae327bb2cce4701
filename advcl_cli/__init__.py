"""advcl: adversarial contrastive pretraining (AdvCL), robust finetuning, attacks and a model zoo."""

from .version import __version__


def load_model(name_or_path: str, device: str = "cpu", kind: str = "classifier", bn_set: str | None = None):
    """A classifier (``kind="classifier"``: images to logits) or a feature extractor
    (``kind="encoder"``: images to backbone features, through BN set ``bn_set``, default ``pgd``
    when the checkpoint has it) as an ``nn.Module`` in eval mode taking [0, 1] images.

    ``name_or_path`` is a checkpoint path or a zoo name (pulled and verified when needed).
    """
    from .zoo import load_model as _load

    return _load(name_or_path, device=device, kind=kind, bn_set=bn_set)


__all__ = ["__version__", "load_model"]
