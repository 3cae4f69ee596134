"""Does static int8 keep a *trained* CNN's predictions? Parity of a pretrained EfficientNet-Lite.

    python benchmarks/int8_pretrained_cnn.py [--limit 500] [--calibration 32]

No trained student exists on a fresh machine, but the reference teacher's image tower is a
pretrained CNN (EfficientNet-Lite0, ImageNet weights from the ``reference`` extra). This runs the
parity report on it (the reference dual encoder as both teacher and student: pretrained towers,
freshly initialised linear heads, seed 0) on seeded CIFAR-10 test images with the variants fp32,
int8-dynamic and int8 (static QDQ, calibrated on seeded CIFAR-10 training images), under the
default gates. Random heads make zero-shot accuracy meaningless, but agreement with the torch
model is exactly the gate's question, and random heads give small class margins, so it is a
harsh test. Writes the report to ``outputs/bench-int8-pretrained/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--calibration", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="outputs/bench-int8-pretrained")
    args = p.parse_args(argv)

    import torch

    from clipcore.data import DataSpec
    from clipcore.towers import build_reference_dual_encoder
    from exports.parity import ParitySettings, run_parity, summary_table

    torch.manual_seed(0)
    model = build_reference_dual_encoder("lite0").eval()
    settings = ParitySettings(templates="openai_cifar", threads=args.threads, batch_size=32, warmup=3, iters=20,
                              throughput_batch=16, throughput_iters=3, calibration_limit=args.calibration,
                              max_flips=8)
    spec = DataSpec(str(SHARED / "cifar10"), split="test", limit=args.limit, shuffle_seed=0)
    report = run_parity(model, model, spec, args.out, variants=["fp32", "int8-dynamic", "int8"], settings=settings)
    paths = report.write(args.out)
    print(summary_table(report))
    for name in ("int8-dynamic", "int8"):
        s = report.subject(name)
        print(f"{name}: {s.status} ({s.precision}), agreement {100 * s.metrics['agreement_student']:.2f} %, "
              f"size {s.size_bytes / 2**20:.2f} MB, p50 {s.latency['p50_ms']:.2f} ms; {s.reason or ''}")
    print("wrote " + ", ".join(map(str, paths.values())))
    return json.loads(report.to_json())


if __name__ == "__main__":
    main()
