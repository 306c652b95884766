"""An `authorization_function` for `mlflow server --app-name basic-auth` that also takes bearer tokens.

MLflow's basic-auth app checks `Authorization: Basic ...` only. For tests of
`MlflowConfig(token=...)` against a server that really checks the token, the
test server (`MlflowServer(root, auth=True, token_users={token: user})`) is
configured with this function: `Authorization: Bearer <token>` authenticates
as the user mapped to the token's SHA-256 in `MLFLOW_TEST_TOKEN_USERS`
(`<sha256>=<user>,...`, so the server never holds the token itself); anything
else goes to the stock basic-auth check. A wrong token gets the same 401.
"""

from __future__ import annotations

import hashlib
import hmac
import os


def authenticate_request_basic_or_token():
    from flask import request
    from mlflow.server.auth import authenticate_request_basic_auth, make_basic_auth_response
    from werkzeug.datastructures import Authorization

    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return authenticate_request_basic_auth()
    digest = hashlib.sha256(header[len("Bearer ") :].encode()).hexdigest()
    for entry in filter(None, os.environ.get("MLFLOW_TEST_TOKEN_USERS", "").split(",")):
        known, _, username = entry.partition("=")
        if hmac.compare_digest(known, digest):
            return Authorization("basic", {"username": username, "password": ""})
    return make_basic_auth_response()
