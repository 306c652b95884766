"""MLflow registry webhooks into Prefect events: a small receiver that `prefect-tensorflow serve` runs.

MLflow 3 (SQL backends) POSTs registry events to a webhook URL, signed the
Standard Webhooks way (`mlflow/webhooks/delivery.py`): headers
`X-MLflow-Delivery-Id`, `X-MLflow-Timestamp` (Unix seconds) and
`X-MLflow-Signature: v1,<base64 HMAC-SHA256 of "<delivery id>.<timestamp>.<body>">`.
The receiver checks, in this order:

- the signature, with the shared secret (`PREFECT_TENSORFLOW_MLFLOW_WEBHOOK_SECRET`),
  compared in constant time: a bad or missing one -> 401;
- the timestamp: more than 5 minutes from now -> 401 (a captured delivery cannot
  be replayed later);
- the delivery id: one seen in the last 10 minutes is a replay (or MLflow's own
  retry of a delivery that was answered): 200, dropped, no event;
- the body: not a JSON object with `entity`, `action` and `data` -> 400.

`model_version_alias.created` becomes the Prefect event
`mlflow.model_version_alias.created` on the resource
`mlflow.registered_model.<name>` (labels `mlflow.alias`, `mlflow.version`; payload
name, version, alias), whose id is derived from the delivery id: a delivery sent
twice is one event to Prefect too. Other events are answered 200 and ignored.

Example:
    >>> import json, time
    >>> body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "",
    ...                    "data": {"name": "iris", "alias": "champion", "version": "3"}}).encode()
    >>> headers = signed_headers("s3cret", "d-1", int(time.time()), body)
    >>> receiver = WebhookReceiver("s3cret")
    >>> event = receiver.accept(headers, body)
    >>> event["event"], event["resource"]["prefect.resource.id"], event["payload"]["version"]
    ('mlflow.model_version_alias.created', 'mlflow.registered_model.iris', '3')
    >>> receiver.accept(headers, body) is None  # the same delivery id again: dropped
    True
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Optional

from prefect_tensorflow.tasks.errors import WebhookRefusedError

DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_HEADER = "X-MLflow-Signature"
SIGNATURE_VERSION = "v1"
MAX_AGE_SECONDS = 300
REMEMBER_SECONDS = 2 * MAX_AGE_SECONDS  # a delivery id older than this has a stale timestamp anyway
MAX_REMEMBERED = 100_000
MAX_BODY_BYTES = 1024 * 1024
PATH = "/mlflow/webhooks"
EVENT_NAMESPACE = uuid.UUID("6f1b3c2e-5d4a-4f7e-9a0b-2c8d1e3f4a5b")  # event ids from delivery ids
ALIAS_CREATED = "mlflow.model_version_alias.created"


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's `v1,<base64 HMAC-SHA256>` of `<delivery id>.<timestamp>.<body>`.

    Example:
        >>> signature("s", "d", "1", b"{}")
        'v1,IU+2+KHu4+2P4cNMuwvd3lx0u3yUZ/KaEHscpFOsm4Y='
    """
    signed = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signed_headers(secret: str, delivery_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers MLflow sends with `body` (for tests and for people checking a receiver).

    Example:
        >>> sorted(signed_headers("s", "d", 1, b"{}"))
        ['Content-Type', 'X-MLflow-Delivery-Id', 'X-MLflow-Signature', 'X-MLflow-Timestamp']
    """
    return {
        "Content-Type": "application/json",
        DELIVERY_ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, delivery_id, str(timestamp), body),
    }


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes, now: float) -> str:
    """The delivery id of a delivery whose signature and timestamp are good.

    Raises:
        WebhookRefusedError: 401, naming the header at fault (missing, bad signature, stale timestamp).

    Example:
        >>> verify_signature("s", signed_headers("s", "d-7", 100, b"{}"), b"{}", now=150)
        'd-7'
        >>> verify_signature("s", signed_headers("s", "d-7", 100, b"{}"), b"{}", now=1000)
        Traceback (most recent call last):
        ...
        prefect_tensorflow.tasks.errors.WebhookRefusedError: webhook delivery refused (401): X-MLflow-Timestamp: expected within 300 s of now, received 900 s away
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    delivery_id = lowered.get(DELIVERY_ID_HEADER.lower(), "")
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    sent = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not (delivery_id and timestamp and sent):
        raise WebhookRefusedError(401, f"expected the {DELIVERY_ID_HEADER}, {TIMESTAMP_HEADER} and {SIGNATURE_HEADER} headers")
    expected = signature(secret, delivery_id, timestamp, body).encode()
    # Standard Webhooks allows several space-separated signatures (a secret being rotated)
    if not any(hmac.compare_digest(candidate.encode(), expected) for candidate in sent.split()):
        raise WebhookRefusedError(401, f"{SIGNATURE_HEADER}: the signature does not match the body and the secret")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise WebhookRefusedError(401, f"{TIMESTAMP_HEADER}: expected Unix seconds, received {timestamp[:40]!r}") from None
    if abs(now - sent_at) > MAX_AGE_SECONDS:
        raise WebhookRefusedError(
            401, f"{TIMESTAMP_HEADER}: expected within {MAX_AGE_SECONDS} s of now, received {abs(now - sent_at):.0f} s away"
        )
    return delivery_id


def prefect_event(delivery_id: str, message: Any) -> Optional[dict[str, Any]]:
    """The Prefect event (`emit_event`'s keywords) of a webhook body, None for an event it does not map.

    Raises:
        WebhookRefusedError: 400, the body is not an MLflow webhook message.

    Example:
        >>> prefect_event("d", {"entity": "model_version", "action": "created", "data": {}}) is None
        True
        >>> prefect_event("d", [1])
        Traceback (most recent call last):
        ...
        prefect_tensorflow.tasks.errors.WebhookRefusedError: webhook delivery refused (400): body: expected a JSON object with entity, action and data
    """
    if not isinstance(message, dict) or not {"entity", "action", "data"} <= set(message) or not isinstance(message["data"], dict):
        raise WebhookRefusedError(400, "body: expected a JSON object with entity, action and data")
    if (message["entity"], message["action"]) != ("model_version_alias", "created"):
        return None
    data = message["data"]
    fields = {key: data.get(key) for key in ("name", "version", "alias")}
    if not all(isinstance(value, str) and value for value in fields.values()):
        raise WebhookRefusedError(400, f"data: expected name, version and alias strings, received {sorted(data)}")
    return {
        "event": ALIAS_CREATED,
        "resource": {
            "prefect.resource.id": f"mlflow.registered_model.{fields['name']}",
            "prefect.resource.name": fields["name"],
            "mlflow.alias": fields["alias"],
            "mlflow.version": fields["version"],
        },
        "payload": fields,
        "id": uuid.uuid5(EVENT_NAMESPACE, f"mlflow-webhook:{delivery_id}"),
    }


class WebhookReceiver:
    """Verifies deliveries and remembers their ids (for `REMEMBER_SECONDS`); see the module docstring."""

    def __init__(self, secret: str, clock: Callable[[], float] = time.time):
        self._secret = secret
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def accept(self, headers: Mapping[str, str], body: bytes) -> Optional[dict[str, Any]]:
        """The Prefect event a delivery asks for; None when there is none (a replay, an unmapped event).

        Raises:
            WebhookRefusedError: 401 (signature, timestamp) or 400 (body).
        """
        now = self._clock()
        delivery_id = verify_signature(self._secret, headers, body, now)
        try:
            message = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise WebhookRefusedError(400, "body: expected JSON") from None
        event = prefect_event(delivery_id, message)
        with self._lock:
            while self._seen and (next(iter(self._seen.values())) < now - REMEMBER_SECONDS or len(self._seen) > MAX_REMEMBERED):
                self._seen.popitem(last=False)
            if delivery_id in self._seen:
                return None
            self._seen[delivery_id] = now
        return event

    def forget(self, headers: Mapping[str, str]) -> None:
        """Forget a delivery whose event could not be sent, so that MLflow's retry is not a replay."""
        lowered = {key.lower(): value for key, value in headers.items()}
        with self._lock:
            self._seen.pop(lowered.get(DELIVERY_ID_HEADER.lower(), ""), None)


def send_event(api_url: str, event: dict[str, Any]) -> None:
    """Send one event to the Prefect API at `api_url` (its own events client: nothing process-wide)."""
    from prefect.events import Event
    from prefect.events.clients import PrefectEventsClient

    async def send() -> None:
        async with PrefectEventsClient(api_url=api_url) as client:
            await client.emit(Event(**event))

    asyncio.run(send())


class WebhookServer:
    """The receiver on `host:port` (`PATH`), in a thread; each accepted event is sent to `api_url`.

    Example (not run here: it binds a port):
        server = WebhookServer("s3cret", "http://127.0.0.1:4200/api", "127.0.0.1", 4201).start()
        ...  # MLflow's webhook URL: server.url
        server.stop()
    """

    def __init__(self, secret: str, api_url: str, host: str, port: int, send: Callable[[str, dict[str, Any]], None] = send_event):
        self.receiver = WebhookReceiver(secret)
        self.api_url = api_url
        self.send = send
        self.httpd = http.server.ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}{PATH}"

    def start(self) -> WebhookServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="mlflow-webhooks", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, str]:
        """(status, text) for one POST."""
        if path.split("?", 1)[0] != PATH:
            return 404, f"expected POST {PATH}"
        try:
            event = self.receiver.accept(headers, body)
        except WebhookRefusedError as err:
            return err.status, err.reason
        if event is None:
            return 200, "ignored"
        try:
            self.send(self.api_url, event)
        except Exception as err:  # noqa: BLE001 - any failure to send: MLflow retries a 5xx, same delivery id
            self.receiver.forget(headers)
            return 503, f"the Prefect API did not take the event: {type(err).__name__}"
        return 200, "sent"


def _handler(server: WebhookServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # the serve log stays readable
            pass

        def _answer(self, status: int, text: str) -> None:
            data = (json.dumps({"status": text}) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self._answer(413 if length > MAX_BODY_BYTES else 400, f"Content-Length: expected 0 to {MAX_BODY_BYTES} bytes")
                return
            body = self.rfile.read(length)
            self._answer(*server.handle(self.path, dict(self.headers.items()), body))

        def do_GET(self) -> None:
            self._answer(405, f"expected POST {PATH}")

    return Handler
