"""MLflow: connections and clients, run tracking, registered model versions and the champion gate.

Example:
    >>> from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
    >>> MlflowConfig.__name__
    'MlflowConfig'
"""
