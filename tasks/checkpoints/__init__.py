"""Checkpoints: their files, the writer, the keep policy, restore, inspection and selection.

Example:
    >>> from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy
    >>> CheckpointPolicy().keep_checkpoint_max
    5
"""
