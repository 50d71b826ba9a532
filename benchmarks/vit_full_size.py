"""Time one training iteration of the full-size Segmenter (ViT-B/16, 512 px) and report peak memory.

Random init (no downloads), steps [16, 5] (a VOC 15-5 step-1 model). Each iteration is a forward pass, a
cross-entropy loss on random labels, a backward pass and an SGD step with the reference optimiser (momentum 0.9,
Nesterov, weight decay 1e-5); bf16 autocast on CUDA, fp32 on CPU. The default batch is the reference's VOC
batch (16, spec section 4).

    .venv/bin/python benchmarks/vit_full_size.py --batch 16 --size 512 --iters 10 --device auto
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.segmenter import Segmenter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"

    torch.manual_seed(0)
    model = Segmenter([16, 5], backbone="vit_base_patch16_384", pretrained="none", image_size=args.size).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-5)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, model.num_classes, (args.batch, args.size, args.size), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device={device} batch={args.batch} size={args.size} params={n_params / 1e6:.1f}M "
          f"precision={'bf16 autocast' if cuda else 'fp32'} threads={torch.get_num_threads()} "
          f"fused_attention={model.fused_attention_enabled}", flush=True)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux (bytes on macOS)
    print(f"peak RSS (host) after building the model and the batch: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30:.2f} GiB", flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    times = []
    for i in range(args.iters):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            out = model(images)
            loss = F.cross_entropy(out.logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        print(f"iter {i}: {times[-1]:.3f} s  loss {loss.item():.4f}", flush=True)

    total = sum(times)
    steady = times[1:] or times  # the first iteration includes kernel selection / allocator warm-up
    print(f"mean s/iter (excluding iter 0 when possible): {sum(steady) / len(steady):.3f}; "
          f"all {len(times)} iterations: {total:.1f} s")
    if cuda:
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB, "
              f"reserved: {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB")
    print(f"peak RSS (host): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
