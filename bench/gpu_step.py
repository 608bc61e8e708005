"""One fine-tuning step of resnet50 at 224 px on a GPU: bf16 autocast + channels_last vs fp32.

Measures what retrain.recipe does per step (forward, cross-entropy, backward, gradient clip,
AdamW step) in images/s, each mode timed in the same run after warm-up; prints the ratio.
Random weights and inputs (nothing downloads): throughput does not depend on their values.

    .venv/bin/python bench/gpu_step.py [--batch-size 64] [--steps 30] [--arch resnet50]

Exits with status 2 and a message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext

import torch


def images_per_second(arch: str, batch_size: int, steps: int, warmup: int, *, bf16: bool) -> tuple[float, float]:
    """(images/s, peak GiB) for ``steps`` timed fine-tuning steps after ``warmup`` untimed ones."""
    import timm

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=1000).to(device).train()
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return batch_size * steps / seconds, torch.cuda.max_memory_allocated() / 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_step: no CUDA device here; run this on a GPU machine (it measures GPU fine-tuning throughput)",
              file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name()
    fp32, fp32_mem = images_per_second(args.arch, args.batch_size, args.steps, args.warmup, bf16=False)
    bf16, bf16_mem = images_per_second(args.arch, args.batch_size, args.steps, args.warmup, bf16=True)
    print(f"{name}, {args.arch} @224, batch {args.batch_size}, {args.steps} timed steps (torch {torch.__version__})")
    print(f"  fp32 (TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} for matmul)   "
          f"{fp32:8.1f} images/s   peak {fp32_mem:5.1f} GiB")
    print(f"  bf16 autocast + channels_last  {bf16:8.1f} images/s   peak {bf16_mem:5.1f} GiB")
    print(f"  speed-up {bf16 / fp32:.2f}x, memory {bf16_mem / fp32_mem:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
