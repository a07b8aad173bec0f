"""megacoca: a CoCa (Contrastive Captioners) trainer on DeepSpeed."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a converted or exported model directory (config.json + model.safetensors) in eval mode."""
    from megacoca.models.coca.loading import load_pretrained

    return load_pretrained(path, **kwargs)


def load_tokenizer(model_or_directory):
    """The tokenizer a model directory recorded (config.json "tokenizer"), for a model from `load` or the
    directory itself."""
    from megacoca.data.tokenizer import load_tokenizer as load_spec
    from megacoca.models.coca.loading import read_config

    if isinstance(model_or_directory, (str, bytes)) or hasattr(model_or_directory, "__fspath__"):
        info = read_config(model_or_directory).get("tokenizer") or {}
    else:
        info = getattr(model_or_directory, "tokenizer_info", None) or {}
    if not info.get("spec"):
        raise ValueError("this model directory records no tokenizer")
    return load_spec(info["spec"], info.get("context_length"))
