"""The cold-load program of the serving check: a SavedModel loaded in a fresh `python -I` process.

`serving_check.check_loads` runs this file by path (`python -I <this file>
REQUEST.json`): isolated mode puts neither the working directory nor this
file's directory on `sys.path`, and this program imports only the standard
library, NumPy and TensorFlow, never `prefect_tensorflow`, so it loads the
model the way a serving process with no project code would. It times
`tf.saved_model.load`, calls `serving_default` on the request's inputs (or
on values made from the signature), times single-row calls, and writes the
outputs (`.npz`) and a JSON report (load and call times, peak RSS from
`getrusage`, the signature, whether any project module was imported). A
failure is reported as TensorFlow's one-line reason, never a traceback.

Example:
    >>> from prefect_tensorflow.tasks.promotion.serving_check_main import one_line
    >>> one_line(OSError("SavedModel file does not exist at: /m/1/{saved_model.pbtxt|saved_model.pb}\\n more"))
    'OSError: SavedModel file does not exist at: /m/1/{saved_model.pbtxt|saved_model.pb}'
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

SIGNATURE_KEY = "serving_default"
_KERAS_OPTIONAL = ("sklearn", "matplotlib", "pandas")  # Keras imports them only if installed; serving never needs them


def one_line(err: BaseException) -> str:
    """`Type: first non-empty line of the message` (TensorFlow appends node traces on further lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else repr(err)}"


def _die_with_parent() -> None:
    """Killed with whoever waits for us (Linux `PR_SET_PDEATHSIG`): a cold load never outlives the check."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)


def _inputs_from_signature(specs: dict[str, Any], rows: int = 4) -> dict[str, Any]:
    """Seeded values for each input: `rows` for an unknown batch dimension (and 1 for other unknown ones)."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for name, spec in specs.items():
        dims = spec.shape.as_list() if spec.shape.rank is not None else [None]
        shape = [(rows if i == 0 else 1) if d is None else d for i, d in enumerate(dims)]
        dtype = spec.dtype
        if dtype.is_floating:
            out[name] = rng.normal(size=shape).astype(dtype.as_numpy_dtype)
        elif dtype.is_integer:
            out[name] = rng.integers(0, 10, size=shape).astype(dtype.as_numpy_dtype)
        elif dtype.is_bool:
            out[name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            out[name] = np.full(shape, b"", dtype=object)
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def import_tensorflow() -> None:
    """Import NumPy and TensorFlow with Keras' optional imports hidden (the warm template imports the same way)."""
    hidden = [name for name in _KERAS_OPTIONAL if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import numpy  # noqa: F401
        import tensorflow  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Load, call and time the SavedModel named in `request`; the report (see the module docstring)."""
    import resource

    report: dict[str, Any] = {"ok": False, "stage": "import"}
    started = time.perf_counter()
    import_tensorflow()
    import numpy as np
    import tensorflow as tf

    report["import_seconds"] = time.perf_counter() - started
    path = request["saved_model"]
    try:
        report["stage"] = "load"
        t0 = time.perf_counter()
        loaded = tf.saved_model.load(path)
        if SIGNATURE_KEY not in loaded.signatures:
            raise KeyError(f"no {SIGNATURE_KEY!r} signature (it has {sorted(loaded.signatures)})")
        fn = loaded.signatures[SIGNATURE_KEY]
        report["load_seconds"] = time.perf_counter() - t0
        _, specs = fn.structured_input_signature
        report["signature"] = {
            "inputs": {k: [v.dtype.name, v.shape.as_list() if v.shape.rank is not None else None] for k, v in specs.items()},
            "outputs": {
                k: [v.dtype.name, v.shape.as_list() if v.shape.rank is not None else None]
                for k, v in fn.structured_outputs.items()
            },
        }
        report["stage"] = "call"
        if request.get("inputs"):
            with np.load(request["inputs"], allow_pickle=False) as npz:
                inputs = {name: npz[name] for name in npz.files}
        else:
            inputs = _inputs_from_signature(dict(specs))
        missing, unknown = sorted(set(specs) - set(inputs)), sorted(set(inputs) - set(specs))
        if missing or unknown:
            raise KeyError(f"the signature takes inputs {sorted(specs)}; missing {missing}, unknown {unknown}")
        feeds = {name: tf.constant(value, dtype=specs[name].dtype) for name, value in inputs.items()}
        t0 = time.perf_counter()
        outputs = {name: tensor.numpy() for name, tensor in fn(**feeds).items()}
        report["first_call_seconds"] = time.perf_counter() - t0
        rows = min(len(v) for v in inputs.values()) if all(np.ndim(v) for v in inputs.values()) else 0
        times = []
        for i in range(int(request.get("latency_calls", 0)) if rows else 0):
            row = {name: value[i % rows : i % rows + 1] for name, value in feeds.items()}
            t0 = time.perf_counter()
            fn(**row)
            times.append((time.perf_counter() - t0) * 1000.0)
        if times:
            report["p50_ms"], report["p99_ms"] = _percentile(times, 50), _percentile(times, 99)
        np.savez(request["outputs"], **outputs)
        report["stage"] = "done"
        report["ok"] = True
    except Exception as err:  # noqa: BLE001  # any failure is the answer: reported as one line to the parent
        report["error"] = one_line(err)
    report["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    report["project_code_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "prefect_tensorflow")
    return report


def answer(request_path: str) -> None:
    """Run the request in the JSON file `request_path` and write its report where it says (all or nothing).

    What `main` does in a fresh process, and what a child forked from the warm template
    (`warm_template_main.py`) does.
    """
    with open(request_path, encoding="utf-8") as handle:
        request = json.load(handle)
    report = run(request)
    tmp = request["report"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(report, handle)
    os.replace(tmp, request["report"])


def main(argv: list[str]) -> int:
    _die_with_parent()
    answer(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
