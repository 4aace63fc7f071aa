"""``python -m bench.masking``: how often each masking kind falls short of its target, and how many
masks per second it draws (one thread, CPU time; ``models/masking.py``'s docstring quotes it)."""
from __future__ import annotations

import numpy as np
import torch

from models.masking import cube_unit_mask, image_block_mask, make_masks, tube_unit_mask


def measure(n: int = 10000, seed: int = 0) -> None:
    """Print the shortfall rates and the speed."""
    import time

    rng = np.random.default_rng(seed)
    for name, fn in (("cube (8,14,14)", cube_unit_mask), ("tube (8,14,14)", tube_unit_mask)):
        for ratio in (0.2, 0.4, 0.6, 0.8):
            short = np.array([r.target - r.count for r in (fn((8, 14, 14), ratio, rng) for _ in range(n))])
            print(f"{name} ratio {ratio}: short in {(short > 0).mean():.2%} of {n}, "
                  f"mean shortfall {short.mean():.2f}, max {short.max()}")
    for k in (78,):
        short = np.array([k - int(image_block_mask((14, 14), k, rng).sum()) for _ in range(n)])
        print(f"image 14x14 {k}: short in {(short > 0).mean():.2%} of {n}, "
              f"mean shortfall {short.mean():.2f}, max {short.max()}")
    for kind, grid in (("cube", (8, 14, 14)), ("tube", (8, 14, 14)), ("frame", (8, 14, 14)),
                       ("image_block", (14, 14))):
        make_masks(kind, 32, grid, rng=rng)
        reps = 30
        t0 = time.process_time()  # CPU time of this process: robust to other load on the box
        for _ in range(reps):
            make_masks(kind, 32, grid, rng=rng)
        dt = time.process_time() - t0
        print(f"{kind} {grid}: {reps * 32 / dt:,.0f} masks/s (batches of 32, one thread, CPU time)")


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10000, help="masks drawn per shortfall measurement")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    measure(args.n, args.seed)


if __name__ == "__main__":
    main()
