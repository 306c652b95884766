"""prefect-tensorflow flows, the command line and the served deployments.

`retrain` and `export-checkpoint` are the flows (`prefect.yaml` deploys them),
`data_sensor` announces data windows as events; `cli` is the
`prefect-tensorflow` command; `deployments` serves or deploys what
`prefect.yaml` defines (with `mlflow_webhooks` beside it); `servers` runs
local server processes.

Example:
    >>> from prefect_tensorflow.flows.deployments import load_definitions
    >>> sorted(d.entrypoint for d in load_definitions())[:2]
    ['prefect_tensorflow.flows.data_sensor:watch_data', 'prefect_tensorflow.flows.export_checkpoint:export_checkpoint']
"""
