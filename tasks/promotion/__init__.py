"""Promotion: deciding and moving what serving reads.

- `outcomes`: one eval set, scored through each SavedModel's serving signature,
  per example, cached by (SavedModel digest, eval data digest);
- `paired`: the paired bootstrap interval of an improvement, McNemar's test;
- the rule itself is `registry.gate` (pure), its configuration `configs.GateConfig`.

Example:
    >>> from prefect_tensorflow.tasks.promotion.outcomes import SUPPORTED_METRICS
    >>> SUPPORTED_METRICS
    ('accuracy', 'error', 'loss', 'mse', 'mae')
"""
