"""Trajectories of pytorch_optimizer's LookSAM (the one peer implementation) on one-tensor
quadratics, where its per-tensor projection equals the paper's global one.

Writes looksam_peer.json next to this file; tests/tests/looksam.rs replays it.
Run with torch and pytorch_optimizer installed:  python tests/data/looksam_peer.py
"""
import json
import pathlib

import pytorch_optimizer
import torch
from pytorch_optimizer import LookSAM

torch.set_default_dtype(torch.float64)


def case(name, base, base_kwargs, rho, k, alpha, adaptive, n=6, steps=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g)
    a = m @ m.T / n + 0.1 * torch.eye(n)
    a = (a + a.T) / 2
    b = torch.randn(n, generator=g)
    init = torch.randn(n, generator=g)
    p = torch.nn.Parameter(init.clone())
    opt = LookSAM([p], base, rho=rho, k=k, alpha=alpha, adaptive=adaptive, foreach=False, **base_kwargs)

    def closure():
        opt.zero_grad()
        loss = 0.5 * p @ (a @ p) - b @ p
        loss.backward()
        return loss

    traj = []
    for _ in range(steps):
        closure()
        opt.step(closure)
        traj.append(p.detach().tolist())
    return {
        "name": name,
        "a": a.tolist(),
        "b": b.tolist(),
        "init": init.tolist(),
        "base": base.__name__,
        "base_kwargs": base_kwargs,
        "rho": rho,
        "k": k,
        "alpha": alpha,
        "adaptive": adaptive,
        "steps": steps,
        "expected": traj,
    }


cases = [
    case("sgd_momentum_k3", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, 0.05, 3, 0.7, False),
    case("adam_k4", torch.optim.Adam, {"lr": 0.02}, 0.1, 4, 0.5, False, seed=1),
    case("sgd_adaptive_k2", torch.optim.SGD, {"lr": 0.05}, 0.5, 2, 0.9, True, seed=2),
]
out = {
    "reference": f"pytorch_optimizer {pytorch_optimizer.__dict__.get('__version__', '4.1.0')} "
    f"LookSAM (foreach=False), torch {torch.__version__} CPU, float64",
    "cases": cases,
}
pathlib.Path(__file__).with_name("looksam_peer.json").write_text(json.dumps(out))
