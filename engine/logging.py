"""Run output: a tqdm progress bar (clips/s, ETA), TensorBoard scalars and a JSON-lines file.

Only rank 0 writes. TensorBoard goes through ``torch.utils.tensorboard`` into
``<output_dir>/tb``; metrics go to ``<output_dir>/metrics.jsonl``, one object per logged step
(``{"step": …, "epoch": …, "time": …, "loss": …, …}``), appended so a resumed run continues the
same file. Memory is the peak CUDA allocation on GPU and the process's peak RSS on CPU.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

import torch

__all__ = ["RunLogger", "peak_memory_gb"]


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on GPU, max RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 2**20


class RunLogger:
    """Progress bar + TensorBoard + JSON lines for one run (no-op on ranks other than 0)."""

    def __init__(
        self,
        output_dir: str,
        *,
        enabled: bool,
        total_steps: int,
        initial_step: int = 0,
        progress_bar: bool = True,
        tensorboard: bool = True,
        jsonl: bool = True,
        desc: str = "train",
    ) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self.tb = None
        self.jsonl = None
        self.bar = None
        self.tb_dir = os.path.join(output_dir, "tb")
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(self.tb_dir)
        if jsonl:
            self.jsonl = open(self.jsonl_path, "a", buffering=1)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit="step",
                            dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def step(self, n: int = 1, **postfix) -> None:
        """Advance the bar by ``n`` steps and show ``postfix`` (e.g. loss, clips/s)."""
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                      for k, v in postfix.items()}, refresh=False)

    def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
        """Write scalars to TensorBoard (``prefix/name``) and one JSON line."""
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.jsonl is not None:
            rec = {"step": step, "split": prefix, "time": time.time()}
            rec.update({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                        for k, v in values.items()})
            self.jsonl.write(json.dumps(rec) + "\n")

    def write(self, msg: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None

