"""Promotion: deciding and moving what serving reads.

- `outcomes`: one eval set, scored through each SavedModel's serving signature,
  per example, cached by (SavedModel digest, eval data digest);
- `paired`: the paired bootstrap interval of an improvement, McNemar's test;
- the rule itself is `registry.gate` (pure), its configuration `configs.GateConfig`.
- `serving_check`: the version loads cold in a fresh process and answers behind
  a real scoring server (`scoring_server`: `mlflow models serve`), within limits;
  both run forked from `warm_template` (TensorFlow and MLflow imported once per process).

Example:
    >>> from prefect_tensorflow.tasks.promotion.outcomes import SUPPORTED_METRICS
    >>> SUPPORTED_METRICS
    ('accuracy', 'error', 'loss', 'mse', 'mae')
"""
