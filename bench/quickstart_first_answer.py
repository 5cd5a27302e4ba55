"""Time from `cxr quickstart` to the first answer of `/predict`, on a fresh CXR_DATA_DIR.

Starts `cxr quickstart --data ... [--checkpoint CKPT] --port P` as a child process, reads the
admin key it prints, then polls `POST /predict` with one test image until it answers 200.
Reports when the stages were done (the key line), when the first answer came, and, measured in
the same run, the warm `/predict` latency afterwards (the first answer / warm ratio says what
the start costs). Stops the server with SIGINT and removes the data dir.

Usage::

    uv run python bench/quickstart_first_answer.py --data ../shared/data/cxr4 \\
        --checkpoint runs/default/encoder.pt --query ../shared/data/cxr4/test/COVID-19/x.jpg \\
        --out runs/quickstart_first_answer.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

KEY = re.compile(r"admin key \(printed once, keep it\): (cxr_\S+)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("--query", required=True, help="an image to ask about")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="quickstart args")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="cxr-quickstart-bench-"))
    env = {**os.environ, "CXR_DATA_DIR": str(data_dir), "CXR_LOG_JSON": "false"}
    command = ["cxr", "quickstart", "--port", str(args.port)]
    for src in args.data:
        command += ["--data", src]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    command += args.extra
    started = time.perf_counter()
    child = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    key_holder: dict[str, float | str] = {}

    def read_stdout() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            sys.stderr.write(line)
            found = KEY.search(line)
            if found:
                key_holder["key"] = found.group(1)
                key_holder["at"] = time.perf_counter() - started

    threading.Thread(target=read_stdout, daemon=True).start()
    query = Path(args.query).read_bytes()
    url = f"http://127.0.0.1:{args.port}/predict"
    row: dict[str, object] = {"data": args.data, "checkpoint": args.checkpoint}
    try:
        while "key" not in key_holder:
            if child.poll() is not None:
                raise SystemExit(f"quickstart exited with {child.returncode} before the key")
            if time.perf_counter() - started > args.timeout:
                raise SystemExit("timed out before the key")
            time.sleep(0.2)
        headers = {"X-API-Key": str(key_holder["key"])}
        with httpx.Client(timeout=120) as client:
            while True:
                try:
                    response = client.post(url, headers=headers, files={"file": ("q", query)})
                    if response.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if child.poll() is not None:
                    raise SystemExit(f"quickstart exited with {child.returncode}")
                time.sleep(0.2)
            first = time.perf_counter() - started
            warm = []
            for _ in range(5):
                t0 = time.perf_counter()
                assert client.post(url, headers=headers, files={"file": ("q", query)}).is_success
                warm.append((time.perf_counter() - t0) * 1000)
        warm_p50 = statistics.median(warm)
        row.update(
            stages_done_s=round(float(key_holder["at"]), 1),
            first_answer_s=round(first, 1),
            warm_predict_p50_ms=round(warm_p50, 1),
            first_over_warm=round(first * 1000 / warm_p50, 1),
        )
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)
    print(json.dumps(row, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
