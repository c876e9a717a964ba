"""bench/load.py --streams keeps working: a tiny run (20 streams, 3 s) end to end, with its table.

No timing assertions: latencies on a shared CPU mean nothing; what must hold at any size is
asserted (every stream opened and stayed open, the other key's new streams all delivered, the
API's streaming connections bounded, no traceback in its log).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from spkd.app.live import POOL_SIZE

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_streams_bench_produces_the_table(tmp_path, redis_url):
    out = tmp_path / "streams.json"
    cmd = [sys.executable, str(ROOT / "bench" / "load.py"), "--streams", "20", "--jobs", "4"]
    cmd += ["--duration", "3", "--rate", "10", "--redis-url", redis_url, "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| A streams open (start / end) | B GET p50 ms | B GET p99 ms |" in proc.stdout
    res = json.loads(out.read_text())
    assert res["held"]["open"] == 20 and res["held_end"]["open"] == 20, res
    assert res["held_end"]["events"] > 0 and res["held_end"]["errors"] == 0, res
    assert res["other_get"]["n"] == 30 and res["other_get"]["errors"] == 0, res
    new = res["other_new_streams"]
    assert new["attempted"] > 0 and new["delivered"] == new["attempted"], new
    conns = res["api_redis_connections"]
    assert conns["samples"] > 0 and 1 <= conns["max_streaming"] <= 1 + POOL_SIZE, conns
    assert res["api_log_tracebacks"] == 0
