"""Serve both deployments from this process (`flow.serve` style), with per-environment overrides.

    python deployments/serve.py                 # embedded defaults, like `make serve`
    python deployments/serve.py --env dev       # deployments/environments/dev.yaml

Starts a local Prefect server on 127.0.0.1:4200 unless PREFECT_API_URL is set.
"""

from __future__ import annotations

import argparse

from environments import load_overrides

from prefect_tensorflow.flows.defaults import apply_environment_defaults

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", help="name of a file in deployments/environments/")
    parser.add_argument("--limit", type=int, default=None, help="most flow runs at once")
    args = parser.parse_args()
    overrides = load_overrides(args.env)
    apply_environment_defaults()
    from prefect_tensorflow.flows.serve import serve_deployments

    serve_deployments(overrides, limit=args.limit)
