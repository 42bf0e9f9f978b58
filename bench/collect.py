"""Collection at production size: N prompts through the endpoint client against a loopback responder that answers at
once (tests/responder.py, in a process of its own), so what is measured is *our* client: requests/s at the configured
concurrency, the client's CPU time per request, peak RSS, and the time and memory to resume from the N-line cache.

    python bench/collect.py [--prompts 100000] [--concurrency 64] [--quick]

Writes bench/results/collect.json. Goal (issue 19): the client is never the bottleneck (≥ 500 requests/s here) and
resuming 100k takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="10k prompts")
    args = parser.parse_args()
    n = 10_000 if args.quick else args.prompts
    os.environ.setdefault("TQDM_DISABLE", "1")
    from soda_distill.config import EndpointConfig
    from soda_distill.endpoint import collect, request_key
    from soda_distill.append_log import AppendLog

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "responder.py"), str(port)], stdout=subprocess.PIPE,
                              text=True)
    url = server.stdout.readline().strip()
    section = EndpointConfig(base_url=url, model="m", api_key_env=None, max_tokens=64, concurrency=args.concurrency)
    bodies = [{"model": "m", "messages": [{"role": "user", "content": f"Question {i}: name a colour."}], "max_tokens": 64}
              for i in range(n)]
    jobs = {request_key(url, b): (f"q{i}", b) for i, b in enumerate(bodies)}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cache_path = Path(tmp) / "cache.jsonl"
            start, cpu = time.perf_counter(), time.process_time()
            sent = collect(section, "bench", jobs, AppendLog(cache_path, "key"), Path(tmp) / "failed.jsonl", "failed",
                           "run again")
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            after_collect = rss_mb()
            # Resume: open the n-line cache and find nothing left to ask, as a rerun does.
            start = time.perf_counter()
            cache = AppendLog(cache_path, "key")
            assert collect(section, "bench", jobs, cache, Path(tmp) / "failed.jsonl", "failed", "run again") == 0
            resume_s = time.perf_counter() - start
            cache_mb = round(cache_path.stat().st_size / 2**20, 1)
            after_resume = rss_mb()
    finally:
        server.kill()
    record = {
        "command": "python bench/collect.py" + (" --quick" if args.quick else f" --prompts {n}")
                   + f" --concurrency {args.concurrency}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "prompts": n, "sent": sent, "concurrency": args.concurrency,
        "requests_per_s": round(n / seconds, 1), "collect_s": round(seconds, 1),
        "client_cpu_ms_per_request": round(1000 * cpu / n, 2),
        "resume_s": round(resume_s, 2), "cache_mb": cache_mb,
        "rss_mb_after_collect": after_collect[0], "peak_rss_mb": after_resume[1], "rss_mb_after_resume": after_resume[0],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"collect{'-quick' if args.quick else ''}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
