"""megacoca: a CoCa (Contrastive Captioners) trainer on DeepSpeed.

The two functions here import what they need when called, so that `import megacoca` (and `megacoca --help`) stays
fast.
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    """The model at `path` in eval mode: a model directory (config.json + model.safetensors), an open_clip
    directory (open_clip_config.json + weights) or a DeepSpeed checkpoint of a megacoca run, of any layout (the
    checkpoint directory or one tag directory). Keywords: device, dtype, kernels, model_config
    (megacoca.checkpoint.loader.load)."""
    from megacoca.checkpoint.loader import load as load_model

    return load_model(path, **kwargs)


def load_tokenizer(model_or_path):
    """The tokenizer a model records (config.json "tokenizer"), for a model from `load` or the path itself."""
    from megacoca.data.tokenizer import load_tokenizer as load_spec

    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        from megacoca.checkpoint.loader import open_source

        info = open_source(model_or_path).tokenizer or {}
    else:
        info = getattr(model_or_path, "tokenizer_info", None) or {}
    if not info.get("spec"):
        raise ValueError("this model records no tokenizer")
    return load_spec(info["spec"], info.get("context_length"))
