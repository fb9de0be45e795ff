"""In-process cost of the per-request metrics update and of one access-log record.

    python -m bench.micro [--count 200000]

Prints JSON: CPU microseconds per ``WorkerMetrics.count_request`` (prometheus-client in
multiprocess mode, as a worker runs it) and per access record written to a file through
``fastproxy.log``'s access logger with the fields a worker logs. An estimate for when the proxy
has no switch to turn a feature off end to end: a loop keeps caches warm, a proxy does not.
Run in its own process because prometheus-client picks its storage when first imported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time


def per_call_us(fn: object, count: int) -> float:
    assert callable(fn)
    for _ in range(1000):
        fn()
    start = time.process_time()
    for _ in range(count):
        fn()
    return (time.process_time() - start) / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("--count", type=int, default=200_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp
        from fastproxy import log
        from fastproxy.metrics import WorkerMetrics

        metrics = WorkerMetrics()
        metrics_us = per_call_us(
            lambda: metrics.count_request("sdk", "api-devices", "forward", 200), args.count
        )
        log.setup("warning", access_log=os.path.join(tmp, "access.log"))
        access = logging.getLogger(log.ACCESS_LOGGER)
        start = time.monotonic()

        def record() -> None:
            if access.isEnabledFor(logging.INFO):
                access.info(
                    "access",
                    extra={
                        "request_id": "5f2b9c0d1e3a4b5c6d7e",
                        "client_ip": "127.0.0.1",
                        "method": "GET",
                        "path": "/api/1/devices/x",
                        "listener": "sdk",
                        "rule": "api-devices",
                        "decision": "forward",
                        "status": 200,
                        "dur_ms": round((time.monotonic() - start) * 1000, 3),
                        "upstream": "origin",
                    },
                )

        access_us = per_call_us(record, args.count // 4)
        log.setup("warning")
    print(json.dumps({"metrics_us": metrics_us, "access_log_us": access_us}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
