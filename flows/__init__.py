"""prefect-tensorflow flows, the command line and the served deployments.

`retrain` and `export-checkpoint` are the flows (`prefect.yaml` deploys them);
`cli` is the `prefect-tensorflow` command; `deployments` serves or deploys
what `prefect.yaml` defines; `servers` runs local server processes.

Example:
    >>> from prefect_tensorflow.flows.deployments import load_definitions
    >>> sorted(d.entrypoint for d in load_definitions())[0]
    'prefect_tensorflow.flows.export_checkpoint:export_checkpoint'
"""
