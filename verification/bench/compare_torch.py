"""One SAM step's optimizer work on the CPU (gradients already in place, no forward/backward):
sam-ndarray's `step_timing` example against two PyTorch implementations, for each thread count,
with the same run's STREAM triad as the bandwidth reference.

The PyTorch cases, each around torch.optim.SGD(lr 0.01, momentum 0.9) with rho 0.05:
  pto.SAM   pytorch_optimizer.SAM as shipped (on the CPU its foreach default is off, and so is
            SGD's): clones the weights each step, per-tensor loops.
  foreach   the algorithm of davda54/sam (https://github.com/davda54/sam, sam.py, class SAM),
            written here with torch._foreach_* ops around SGD(foreach=True); see ForeachSAM.
Each case: a warm-up step, then the median of --iters steps. Our bandwidth uses the 40 B per
f32 parameter model of one SAM step with SGD momentum (docs/design.md section 10), as a
percentage of the triad (best of its repetitions) measured by the same step_timing process."""

import argparse
import importlib.metadata
import os
import subprocess
import time

import torch
from pytorch_optimizer import SAM as PtoSAM

RHO, LR, MOMENTUM = 0.05, 0.01, 0.9
MODEL_BYTES = 40  # per f32 parameter and SAM step with SGD momentum (docs/design.md section 10)


def resnet18_shapes():
    """ResNet-18's 62 parameter tensors (ImageNet head), in the order of
    sam-ndarray/benches/common/shapes.rs: 11 689 512 elements."""
    s = []

    def conv(shape):
        s.extend([shape, (shape[0],), (shape[0],)])  # convolution, batch-norm weight and bias

    conv((64, 3, 7, 7))
    for _ in range(4):
        conv((64, 64, 3, 3))
    for c in (128, 256, 512):
        conv((c, c // 2, 3, 3))
        for _ in range(3):
            conv((c, c, 3, 3))
        conv((c, c // 2, 1, 1))
    s.extend([(1000, 512), (1000,)])
    return s


def shapes(name):
    return resnet18_shapes() if name == "resnet18" else [(int(float(name)),)]


class ForeachSAM(torch.optim.Optimizer):
    """SAM as davda54/sam's sam.py defines it (non-adaptive), with foreach ops.

    first_step: grad_norm = 2-norm of the per-tensor gradient 2-norms, scale = rho /
    (grad_norm + 1e-12); back each weight up into old_p; p += scale * grad.
    second_step: p.data = old_p (a swap of storage, no copy); base_optimizer.step().
    Unlike the reference, the backup buffers are kept from step to step (the storage swapped
    out in second_step is the next step's backup) instead of cloned, and the climb is one
    _foreach_add_ with alpha=scale instead of a temporary grad * scale, so a step allocates
    nothing."""

    def __init__(self, params, base_optimizer, rho=RHO, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)), 2)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            scale = float(group["rho"] / (grad_norm + 1e-12))
            for p in params:
                if "old_p" not in self.state[p]:
                    self.state[p]["old_p"] = torch.empty_like(p)
            torch._foreach_copy_([self.state[p]["old_p"] for p in params], params)
            torch._foreach_add_(params, [p.grad for p in params], alpha=scale)

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    st = self.state[p]
                    st["old_p"], p.data = p.data, st["old_p"]
        self.base_optimizer.step()


def make_params(name):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes(name)]
    for p in params:
        p.grad = 0.5 * p.detach() + 0.01  # stays in place: serves as both gradients
    return params


def pto_step(name):
    opt = PtoSAM(make_params(name), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

    def step():
        opt.first_step(zero_grad=False)
        opt.second_step(zero_grad=False)

    return step


def foreach_step(name):
    opt = ForeachSAM(make_params(name), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
                     foreach=True)

    def step():
        opt.first_step()
        opt.second_step()

    return step


def median_ms(step, iters):
    step()  # warm-up: creates the optimizer state
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def run_ours(binary, threads, sizes, iters, triad_reps):
    """Runs step_timing on `threads` rayon threads: (triad GB/s, {case: (elements, ms)})."""
    out = subprocess.run(
        [binary, "--iters", str(iters), "--sizes", sizes, "--triad-reps", str(triad_reps)],
        check=True, capture_output=True, text=True,
        env={**os.environ, "RAYON_NUM_THREADS": str(threads)},
    ).stdout
    triad, cases = None, {}
    for line in out.splitlines():
        f = line.split()
        if f[0] == "triad":
            if int(f[1]) != threads:
                raise SystemExit(f"{binary} ran the triad on {f[1]} threads, not {threads}")
            triad = float(f[2])
        elif f[0] == "case":
            cases[f[1]] = (int(f[2]), float(f[3]))
    return triad, cases


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours-rayon", required=True,
                    help="step_timing built with --features rayon (used for threads > 1)")
    ap.add_argument("--ours-serial",
                    help="step_timing built without rayon (used for 1 thread if given)")
    ap.add_argument("--sizes", default="1e7,resnet18",
                    help="comma-separated element counts and/or resnet18 (default %(default)s)")
    ap.add_argument("--iters", type=int, default=20, help="timed steps per case (default 20)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--triad-reps", type=int, default=10,
                    help="triad repetitions, the best is kept (default 10)")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    sizes = a.sizes.split(",")
    if a.iters < 1 or a.triad_reps < 1 or min(threads) < 1:
        ap.error("--iters, --triad-reps and every thread count must be at least 1")
    for name in sizes:
        shapes(name)  # fails early on a bad size

    print(f"torch {torch.__version__}, pytorch-optimizer {importlib.metadata.version('pytorch-optimizer')}, "
          f"{os.cpu_count()} CPUs; median of {a.iters} steps after a warm-up step; "
          f"rho {RHO}, SGD lr {LR} momentum {MOMENTUM}")
    for t in threads:
        serial = t == 1 and a.ours_serial
        binary = a.ours_serial if serial else a.ours_rayon
        torch.set_num_threads(t)
        triad, ours = run_ours(binary, t, a.sizes, a.iters, a.triad_reps)
        print(f"\n{t} thread(s) (ours: {'serial' if serial else 'rayon'} build; torch: "
              f"get_num_threads() = {torch.get_num_threads()}); same-run STREAM triad "
              f"{triad:.2f} GB/s (best of {a.triad_reps})")
        print(f"{'case':>9} {'elements':>10} {'ours ms':>9} {'pto.SAM ms':>11} {'foreach ms':>11}"
              f" {'pto/ours':>9} {'fe/ours':>8} {'ours GB/s':>10} {'% triad':>8}")
        for name in sizes:
            n, ms = ours[name]
            pto = median_ms(pto_step(name), a.iters)
            fe = median_ms(foreach_step(name), a.iters)
            gbs = MODEL_BYTES * n / (ms * 1e-3) / 1e9
            print(f"{name:>9} {n:>10} {ms:>9.3f} {pto:>11.3f} {fe:>11.3f} {pto / ms:>8.2f}x"
                  f" {fe / ms:>7.2f}x {gbs:>10.2f} {100 * gbs / triad:>7.1f}%")


if __name__ == "__main__":
    main()
