#!/usr/bin/env python3
"""Compare one SAM step of sam-cuda with pytorch_optimizer.SAM on the same GPU.

Run through compare_torch.sh (which installs torch and pytorch-optimizer and builds our
benchmark). For each size the optimizer work of one SAM step is timed with CUDA events,
median over --iters, gradients fixed (no model): first_step (norm + perturb) and second_step
(restore + base step), around torch.optim.SGD(momentum=0.9) and torch.optim.AdamW, in each
implementation variant torch offers (foreach / for-loop / fused). Our side runs
`examples/bench --machine` (reduce + perturb + finiteness check of the second gradient + fused
restore-and-step: it does strictly more work than pytorch_optimizer, which checks nothing).
"""

import argparse
import statistics
import subprocess
import sys

import torch
import pytorch_optimizer


def resnet50_shapes():
    s = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            out = planes * 4
            s += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            s += [(planes, planes, 3, 3), (planes,), (planes,)]
            s += [(out, planes, 1, 1), (out,), (out,)]
            if b == 0:
                s += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    s += [(1000, 2048), (1000,)]
    return s


def shapes_for(label):
    if label == "resnet50":
        return resnet50_shapes()
    return [(int(float(label)),)]


def time_torch(shapes, base, kwargs, iters):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    opt = pytorch_optimizer.SAM(params, base, rho=0.05, **kwargs)

    def step():
        opt.first_step(zero_grad=False)
        # (a framework computes the gradient at the perturbed weights here)
        opt.second_step(zero_grad=False)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del opt, params
    torch.cuda.empty_cache()
    return statistics.median(times)


def run_ours(binary, sizes, iters):
    out = subprocess.run(
        [binary, "--machine", "--sizes", sizes, "--iters", str(iters)],
        check=True, capture_output=True, text=True,
    ).stdout
    ours = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] == "SAMCUDA":
            ours[(parts[1], parts[2])] = float(parts[4])
    return ours


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ours", required=True, help="path of the sam-cuda bench example")
    ap.add_argument("--sizes", default="1e6,1e7,1e8,resnet50")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("compare_torch: no CUDA device visible to torch")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"pytorch_optimizer {getattr(pytorch_optimizer, '__version__', '?')}")
    ours = run_ours(args.ours, args.sizes, args.iters)

    configs = {
        "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
        "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    }
    variants = [("foreach", dict(foreach=True)), ("for-loop", dict(foreach=False)), ("fused", dict(fused=True))]
    print(f"{'size':>9} {'base':>6} {'ours ms':>9} | {'torch variant':>13} {'torch ms':>9} {'torch/ours':>10}")
    for label in args.sizes.split(","):
        shapes = shapes_for(label)
        for name, (base, kw) in configs.items():
            mine = ours.get((name, label))
            if mine is None:
                print(f"{label:>9} {name:>6}: no result from our benchmark (skipped there?)")
                continue
            for vname, vkw in variants:
                try:
                    theirs = time_torch(shapes, base, {**kw, **vkw}, args.iters)
                except (RuntimeError, TypeError, ValueError) as e:
                    print(f"{label:>9} {name:>6} {mine:>9.4f} | {vname:>13} unavailable: {e}")
                    continue
                print(f"{label:>9} {name:>6} {mine:>9.4f} | {vname:>13} {theirs:>9.4f} {theirs / mine:>9.2f}x")
            copy = ours.get(("copy", label))
            if copy is not None and name == "sgd":
                print(f"{label:>9} {'copy':>6} {copy:>9.4f} | (device-to-device copy of the weights, for scale)")


if __name__ == "__main__":
    main()
