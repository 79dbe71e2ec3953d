"""Evaluation: held-out rows scored during training and ``posttrain eval`` of saved models (docs/eval.md).

- :mod:`posttrain.eval.metrics`: teacher-forced metrics (reply loss and token accuracy, preference and
  pairwise accuracy);
- :mod:`posttrain.eval.answers`: answers from the one inference engine (the live model in-process, a saved
  model in an ``InferenceEngine``, a served model by id) and their grades;
- :mod:`posttrain.eval.runner`: :class:`Evaluator`, what a training job runs at its evaluation steps;
- :mod:`posttrain.eval.guard`: the reward-hacking guard of reinforcement jobs;
- :mod:`posttrain.eval.compare`: several models scored side by side (``posttrain eval``).
"""
