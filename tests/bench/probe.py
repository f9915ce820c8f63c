"""A /health prober in its own process, so the load generator's busy event loop does not
inflate what it measures. Prints a JSON list of latencies (seconds) on stdout.

    python -m tests.bench.probe PORT SECONDS INTERVAL
"""

from __future__ import annotations

import http.client
import json
import sys
import time


def main() -> None:
    port, seconds, interval = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and len(latencies) < 100_000:
        t0 = time.perf_counter()
        conn.request("GET", "/health")
        answer = conn.getresponse()
        answer.read()
        if answer.status == 200:
            latencies.append(time.perf_counter() - t0)
        time.sleep(interval)
    conn.close()
    json.dump(latencies, sys.stdout)


if __name__ == "__main__":
    main()
