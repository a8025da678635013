"""What one forward costs per request as the batch grows: the numbers behind ``max_batch_size``.

  flock /tmp/cicada-bench.lock python loadtest/batch_curve.py [--models bert-base,resnet-50] \
      [--json bench-results/batch-curve.json]

Plain PyTorch (``from_pretrained``, eval, inference mode), the inputs ``kserve_compare.py``
sends (16 tokens, or one 224x224 image, per request), batches of 1, 4, 8 and 32 at 1 and 2
intra-op threads; the fastest of 3 forwards after one warm-up (1 of 32-batches).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCHES = (1, 4, 8, 32)


def curve(path: Path, model: str) -> list[dict[str, float]]:
    import torch
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    net = getattr(transformers, arch).from_pretrained(str(path)).eval()
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for b in BATCHES:
            x = {"pixel_values": torch.randn(b, 3, 224, 224)} if model.startswith("resnet") else \
                {"input_ids": torch.randint(0, 1000, (b, 16))}
            with torch.inference_mode():
                net(**x)
                best = float("inf")
                for _ in range(3 if b < 32 else 1):
                    t = time.perf_counter()
                    net(**x)
                    best = min(best, time.perf_counter() - t)
            rows.append({"threads": threads, "batch": b, "forward_ms": round(best * 1e3, 1),
                         "per_request_ms": round(best * 1e3 / b, 1)})
            print(model, rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bert-base,resnet-50")
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "cicada-kserve-models")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results/batch-curve.json")
    args = ap.parse_args()
    from cicada_async.bench.cold_start_report import script_provenance
    from cicada_async.models.catalogue import make_model

    out: dict[str, Any] = {**script_provenance("loadtest/batch_curve.py"), "models": {}}
    for model in args.models.split(","):
        path = args.model_dir / model
        if not (path / "config.json").exists():
            make_model(model, path)
        out["models"][model] = curve(path, model)
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
