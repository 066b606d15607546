"""Trajectories of torch.amp.GradScaler's dynamic loss scale (on the CPU), for the replay of
sam_core::LossScaler in tests/tests/mixed_precision.rs.

Each case drives a real GradScaler through a training loop of one f32 parameter and SGD: the
loss is the parameter's sum times a factor that is infinite on the iterations listed in
`overflow`, so that the scaled gradient overflows there. It records, after every
`scaler.update()`, whether the scaler found an overflow in that iteration, its scale (the f32
bit pattern) and its growth tracker.

Writes grad_scaler.json next to this file. Run with torch installed:
    python tests/data/grad_scaler.py
"""
import json
import pathlib
import struct

import torch
from torch.amp import GradScaler


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def case(name, steps, overflow, **config):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float32))
    opt = torch.optim.SGD([p], lr=0.01)
    scaler = GradScaler("cpu", **config)
    found_inf, scale_bits, growth_tracker = [], [], []
    for t in range(steps):
        opt.zero_grad()
        factor = float("inf") if t in overflow else 1.0
        loss = p.sum() * factor
        scaler.scale(loss).backward()
        scaler.step(opt)
        found = sum(v.item() for v in scaler._found_inf_per_device(opt).values()) > 0
        scaler.update()
        found_inf.append(bool(found))
        scale_bits.append(f32_bits(scaler.get_scale()))
        growth_tracker.append(int(scaler._growth_tracker.item()))
    return {
        "name": name,
        "config": config,
        "found_inf": found_inf,
        "scale_bits": scale_bits,
        "growth_tracker": growth_tracker,
    }


def main():
    cases = [
        case("defaults, growth every 3", 24, {2, 3, 9, 15, 16, 17}, growth_interval=3),
        case(
            "odd factors and a scale not representable in f32",
            30,
            {0, 7, 8, 20},
            init_scale=1000.7,
            growth_factor=3.0,
            backoff_factor=0.3,
            growth_interval=2,
        ),
        case("growth stops at the f32 range", 12, set(), init_scale=3.0e38, growth_interval=1),
        case("backoff to zero", 160, set(range(160)), init_scale=1.0e-30),
        case("torch defaults", 2012, {5}),
    ]
    out = {
        "generator": "tests/data/grad_scaler.py",
        "torch": torch.__version__,
        "cases": cases,
    }
    path = pathlib.Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(out) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
