"""`MlflowConnection`: the MLflow connection as a Prefect block, saved once and picked in the UI.

It is `MlflowConfig` (same fields, same behaviour) plus Prefect's block
machinery, so a saved connection keeps its token or password as secrets.
Deployment runs accept only a saved block for their `mlflow` parameter
(`security.check_mlflow_connection`). `prefect block register -m
prefect_tensorflow.tasks` (or `prefect-tensorflow serve`) makes the type
appear in the UI.

Example:
    >>> from prefect_tensorflow.tasks.blocks import MlflowConnection
    >>> MlflowConnection(tracking_uri="http://mlflow.internal:5000", username="ci", password="s3cret")
    MlflowConnection(tracking_uri='http://mlflow.internal:5000', ..., password=SecretStr('**********'), ...)
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block

from .registry.mlflow_connection import MlflowConfig


class MlflowConnection(MlflowConfig, Block):
    """Connection to an MLflow tracking server and model registry."""

    _block_type_name = "MLflow Connection"
    _block_type_slug = "mlflow-connection"
    _description = "Tracking and registry URIs, experiment and credentials of an MLflow server."
    _documentation_url = "https://mlflow.org/docs/latest/tracking/server.html"  # type: ignore[assignment]

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        # Every field is optional (unset ones fall back to MLflow's environment variables), so
        # a bare `{"$ref": <saved block>}`, which the Run form's block picker sends, would also
        # match the block's own schema, and Prefect's `oneOf: [block, {"$ref": ...}]` check
        # would refuse the picked block. An inline value never has a `$ref` key.
        schema = super().__get_pydantic_json_schema__(core_schema, handler)
        schema["not"] = {"required": ["$ref"]}
        return schema
