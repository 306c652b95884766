"""State for the browser test of an incomparable champion gate, made through the library beforehand.

`incomparable_champion(...)` registers, on the stack's MLflow server, a first version whose
SavedModel's input is named `measurements` (`gate_models.renamed_input_model`, from the session's
iris checkpoint) and makes it `@champion` under the registry lock of the stack's Prefect server.
An iris export registered next under the same name (input `features`) cannot be compared with it:
the gate pauses the run for approval.

Example:
    >>> from browser_gate import RENAMED
    >>> RENAMED
    'gate_models:renamed_input_model'
"""

from __future__ import annotations

from pathlib import Path

RENAMED = "gate_models:renamed_input_model"


def incomparable_champion(trained_dir: Path, workdir: Path, *, name: str, mlflow_uri: str, api_url: str) -> int:
    """Register the renamed-input export of step 300 as `name` version 1 and make it champion; returns 1."""
    from helpers import export
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_tensorflow.tasks import iris
    from prefect_tensorflow.tasks.checkpoints.selection import select_checkpoint_at_step
    from prefect_tensorflow.tasks.registry.aliases import move_alias, registry_lock
    from prefect_tensorflow.tasks.registry.mlflow_connection import MlflowConfig
    from prefect_tensorflow.tasks.registry.model_versions import register_model_version

    ref = select_checkpoint_at_step(str(trained_dir), 300)
    exported = export(ref.path, workdir / "exports", model=RENAMED, data=iris.DATA)
    connection = MlflowConfig(tracking_uri=mlflow_uri, experiment_name="browser-gate-setup")
    registered = register_model_version(exported, name, connection, checkpoint=ref, data=iris.DATA)
    with temporary_settings(updates={PREFECT_API_URL: api_url}), registry_lock(name):
        move_alias(
            connection.client(), name, "champion", registered.version, expected_from=None, reason="test setup", kind="manual"
        )
    return registered.version
