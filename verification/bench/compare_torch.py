"""Times one SAM step's optimizer work in PyTorch (pytorch_optimizer.SAM around
torch.optim.SGD(momentum=0.9), gradients already in place, no forward/backward) on the CPU and
compares with sam-ndarray's `step_timing` example on the same sizes and thread count."""

import argparse
import subprocess
import time

import torch
from pytorch_optimizer import SAM


def resnet18_shapes():
    s = [(64, 3, 7, 7), (64,), (64,)]

    def conv(o, i, k):
        s.extend([(o, i, k, k), (o,), (o,)])

    for o, i, first in [(64, 64, False), (128, 64, True), (256, 128, True), (512, 256, True)]:
        conv(o, i, 3)
        conv(o, o, 3)
        if first:
            conv(o, i, 1)
        conv(o, o, 3)
        conv(o, o, 3)
    s.extend([(1000, 512), (1000,)])
    return s


def shapes(name):
    return resnet18_shapes() if name == "resnet18" else [(int(float(name)),)]


def torch_ms(name, iters):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes(name)]
    for p in params:
        p.grad = 0.5 * p.detach() + 0.01
    opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)

    def step():
        opt.first_step(zero_grad=False)
        opt.second_step(zero_grad=False)

    step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ours", required=True, help="path of the step_timing example binary")
    ap.add_argument("--sizes", default="1e5,1e6,1e7,resnet18")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    env = {"RAYON_NUM_THREADS": str(a.threads)}
    import os

    out = subprocess.run(
        [a.ours, "--iters", str(a.iters), "--sizes", a.sizes],
        check=True, capture_output=True, text=True, env={**os.environ, **env},
    ).stdout
    ours = {l.split()[1]: float(l.split()[3]) for l in out.splitlines() if l.startswith("case ")}
    print(f"torch {torch.__version__}, threads {a.threads}, median of {a.iters} steps")
    print(f"{'case':>9} {'ours ms':>9} {'torch ms':>9} {'speed-up':>9}")
    for name in a.sizes.split(","):
        t = torch_ms(name, a.iters)
        print(f"{name:>9} {ours[name]:>9.3f} {t:>9.3f} {t / ours[name]:>8.2f}x")


if __name__ == "__main__":
    main()
