"""advcl: adversarial contrastive pretraining (AdvCL), robust finetuning, attacks and a model zoo."""

from .version import __version__


def load_model(name_or_path: str, device: str = "cpu"):
    """A classifier as an ``nn.Module`` in eval mode taking [0, 1] images.

    ``name_or_path`` is a checkpoint path or a zoo name (pulled and verified when needed).
    """
    from .zoo import load_model as _load

    return _load(name_or_path, device=device)


__all__ = ["__version__", "load_model"]
