"""Evaluation: zero-shot classification, image<->text retrieval, captioning (megacoca.eval.runner)."""

from megacoca.eval.runner import EvalSet, evaluate, load_eval_set, load_model_for_eval, make_train_eval_fn

__all__ = ["EvalSet", "evaluate", "load_eval_set", "load_model_for_eval", "make_train_eval_fn"]
