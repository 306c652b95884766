"""prefect-tensorflow flows, the command line and the served deployments."""
