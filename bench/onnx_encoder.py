"""ONNX Runtime against eager torch for the CPU encoder, measured in the same run.

Exports the checkpoint's encoder to ONNX (opset 17, batch dimension dynamic), checks that both
give the same embeddings, then times single-image and batched forwards alternately (so machine
load hits both sides alike) with the same thread count. Prints JSON rows with `batch`,
`torch_p50_ms`, `ort_p50_ms`, `speedup` (torch / ORT) and the max absolute difference.

onnxruntime is not a dependency of the service (it would be adopted only if it wins); run with::

    uv run --with onnxruntime --with onnx python bench/onnx_encoder.py --checkpoint CKPT \\
        [--threads 1] [--iterations 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    from training.checkpoint import load_checkpoint
    from training.threads import ThreadPolicy, apply_thread_policy

    # The script's process start: both sides of the ratio run with the policy's count.
    policy = apply_thread_policy(
        ThreadPolicy(kind="bench", threads=args.threads, reason="--threads")
    )
    loaded = load_checkpoint(args.checkpoint, map_location="cpu")
    encoder = loaded.encoder.eval()
    size = loaded.preprocessing.image_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "encoder.onnx"
        example = torch.randn(1, 1, size, size)
        torch.onnx.export(
            encoder,
            (example,),
            str(path),
            input_names=["x"],
            output_names=["embedding"],
            dynamic_axes={"x": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = policy.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 1, size, size)
            with torch.inference_mode():
                expected = encoder(x).numpy()
            got = session.run(None, {"x": x.numpy()})[0]
            diff = float(np.abs(expected - got).max())
            torch_ms, ort_ms = [], []
            for _ in range(3):  # warm-up
                session.run(None, {"x": x.numpy()})
                with torch.inference_mode():
                    encoder(x)
            for _ in range(args.iterations):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    encoder(x)
                torch_ms.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                session.run(None, {"x": x.numpy()})
                ort_ms.append((time.perf_counter() - t0) * 1000)
            t50, o50 = statistics.median(torch_ms), statistics.median(ort_ms)
            rows.append(
                {
                    "encoder": loaded.encoder_name,
                    "image_size": size,
                    "batch": batch,
                    "threads": policy.threads,
                    "torch_p50_ms": round(t50, 2),
                    "ort_p50_ms": round(o50, 2),
                    "speedup": round(t50 / o50, 2),
                    "max_abs_diff": diff,
                }
            )
    text = json.dumps(rows, indent=2)
    sys.stdout.write(text + "\n")
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
