"""In-process cost of the per-request metrics update and of one access-log record.

    python -m bench.micro [--count 200000]

Prints JSON: CPU microseconds of the metrics of one proxied request, as a worker counts them
(``metrics_us``: ``WorkerMetrics.request_done`` into plain Python numbers, the bytes of one read
and one write added to the listener's totals, and the share of one ``publish`` per second at
1000 requests/s, the whole publish timed as ``publish_us``); what the same updates cost written
straight to prometheus-client's multiprocess files (``metrics_direct_us``: the request counter,
two histogram observations and the two byte counters, the alternative not chosen); and what one
counter increment in those files costs (``metrics_counter_us``, the only update before the
histograms and bytes were added); per access record written to a file through
``fastproxy.log.access`` (the buffered writer) with the fields a worker logs, building the
dict and one flush per 100 records included (``access_log_us``); and per heartbeat flush, the
one system call a worker makes each second, here with 100 records pending (``access_flush_us``,
already in ``access_log_us``). An estimate for when the proxy has no switch to turn a feature
off end to end: a loop keeps caches warm, a proxy does not. Run in its own process because
prometheus-client picks its storage when first imported.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

#: a browser's User-Agent, as the record truncates and decodes it
AGENT = (
    b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/131.0.0.0 Safari/537.36"
)
#: records pending at a heartbeat flush in ``access_flush_us``: a worker serving 100 requests/s
FLUSH_RECORDS = 100
#: requests per metrics publish in ``metrics_us``: a worker serving 1000 requests/s
PUBLISH_EVERY = 1000


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
        totals = [0, 0]  # a listener's received and sent bytes, as ``worker.Listener`` keeps them
        data = b"x" * 300

        def request_done() -> None:
            totals[0] += len(data)
            metrics.request_done("sdk", "api-devices", "forward", 200, 0.0042, "origin", 0.0031)
            totals[1] += len(data)

        def publish() -> None:
            metrics.publish([("sdk", totals[0], totals[1])])
            totals[0] = totals[1] = 0

        def request_then_publish() -> None:
            request_done()
            publish()

        publish_us = per_call_us(request_then_publish, args.count // 100)
        publish_us -= per_call_us(request_done, args.count // 100)
        metrics_us = per_call_us(request_done, args.count) + publish_us / PUBLISH_EVERY
        requests = metrics.requests.labels("sdk", "api-devices", "forward", "2xx")
        duration = metrics.request_duration.labels("sdk", "api-devices")
        upstream = metrics.upstream_response.labels("origin")
        received = metrics.received_bytes.labels("sdk")
        sent = metrics.sent_bytes.labels("sdk")

        def direct() -> None:
            requests.inc()
            duration.observe(0.0042)
            upstream.observe(0.0031)
            received.inc(len(data))
            sent.inc(len(data))

        direct_us = per_call_us(direct, args.count)
        counter_us = per_call_us(requests.inc, args.count)
        log.setup("warning", access_log=os.path.join(tmp, "access.log"))
        writer = log.access
        assert writer is not None
        start = time.monotonic()

        def record() -> None:
            # the fields and the order ClientProtocol._access_log writes (a request with a
            # query string, redacted as by default)
            writer.write(
                {
                    "request_id": "5f2b9c0d1e3a4b5c6d7e",
                    "client_ip": "127.0.0.1",
                    "method": "GET",
                    "host": "sdk.example.com",
                    "path": "/api/1/devices/x",
                    "query": log.redact_query(b"session=abc&page=2").decode("ascii"),
                    "listener": "sdk",
                    "tls": True,
                    "rule": "api-devices",
                    "decision": "forward",
                    "status": 200,
                    "reason": None,
                    "duration_s": round(time.monotonic() - start, 6),
                    "upstream": "origin",
                    "server": "10.0.0.5:8080",
                    "upstream_response_s": round(time.monotonic() - start, 6),
                    "bytes_in": 412,
                    "bytes_out": 1187,
                    "user_agent": AGENT[:200].decode("ascii", "backslashreplace"),
                    "generation": 3,
                }
            )

        def records_then_flush() -> None:
            for _ in range(FLUSH_RECORDS):
                record()
            writer.flush()

        # A flush every FLUSH_RECORDS records (~28 KB, below the 64 KiB limit): one write(2)
        # per 100 records, as a worker at 100 requests/s; busier workers write 64 KiB at a time.
        access_us = per_call_us(records_then_flush, args.count // FLUSH_RECORDS) / FLUSH_RECORDS

        flush_cpu = 0.0
        rounds = max(args.count // (10 * FLUSH_RECORDS), 1)
        for _ in range(rounds):
            for _ in range(FLUSH_RECORDS):
                record()
            before = time.process_time()
            writer.flush()
            flush_cpu += time.process_time() - before
        log.setup("warning")
    print(
        json.dumps(
            {
                "metrics_us": metrics_us,
                "publish_us": publish_us,
                "metrics_direct_us": direct_us,
                "metrics_counter_us": counter_us,
                "access_log_us": access_us,
                "access_flush_us": flush_cpu / rounds * 1e6,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
