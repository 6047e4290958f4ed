"""Runs a command and samples its resident set size (``/proc/PID/status`` VmRSS, every 0.2 s).

``/usr/bin/time -v``'s "Maximum resident set size" misses peaks in runs whose memory report
resets the kernel's high-water mark per stage (``report.memory``), so this samples instead.

    python benchmarks/peak_rss.py OUT.json -- python compress.py ...
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` and its descendants (the largest one: /usr/bin/time wraps python)."""
    kids = [pid]
    try:
        import psutil

        kids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - psutil missing or the process ended
        pass
    return max(_rss(k) for k in kids)


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    out, cmd = Path(sys.argv[1]), sys.argv[sys.argv.index("--") + 1 :]
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    peak, peak_t, trace = 0, 0.0, []
    while proc.poll() is None:
        r = rss_bytes(proc.pid)
        if r > peak:
            peak, peak_t = r, time.time() - t0
        if not trace or time.time() - t0 - trace[-1][0] >= 5:
            trace.append((round(time.time() - t0, 1), r))
        time.sleep(0.2)
    res = {
        "cmd": cmd,
        "rc": proc.returncode,
        "wall_s": round(time.time() - t0, 1),
        "peak_rss_bytes": peak,
        "peak_at_s": round(peak_t, 1),
        "rss_trace_5s": trace,
    }
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "rss_trace_5s"}))


if __name__ == "__main__":
    main()
