"""Evaluation: zero-shot classification, image<->text retrieval, captioning (megacoca.eval.runner).

Names are imported lazily so that `megacoca --help` (which imports megacoca.eval.cli) does not load torch.
"""

__all__ = ["EvalSet", "evaluate", "load_eval_set", "load_model_for_eval", "make_train_eval_fn"]


def __getattr__(name):
    if name in __all__:
        from megacoca.eval import runner  # lazy: see the module docstring

        return getattr(runner, name)
    raise AttributeError(f"module 'megacoca.eval' has no attribute {name!r}")
