"""megacoca: a CoCa (Contrastive Captioners) trainer on DeepSpeed."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a converted or exported model directory (config.json + model.safetensors) in eval mode."""
    from megacoca.models.coca.loading import load_pretrained

    return load_pretrained(path, **kwargs)
