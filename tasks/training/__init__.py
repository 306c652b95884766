"""Training: the loop, preemption, the sidecar evaluator, the metric sender, multi-worker and sweeps.

Example:
    >>> from prefect_tensorflow.tasks.training.loop import TrainResult
    >>> TrainResult.__name__
    'TrainResult'
"""
