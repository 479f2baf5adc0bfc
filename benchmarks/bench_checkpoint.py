"""What the checkpoint manifest costs: save (with the sha256 manifest written last) and
verify times of a training checkpoint, by model size.

    python benchmarks/bench_checkpoint.py [--sizes 128,256] [--depth 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from loopedlm import LoopedGPT, ModelConfig
from loopedlm.model.checkpoint import (
    TRAIN_FILES,
    load_training_state,
    save_training_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from loopedlm.train.optim import LoopedOptimizer, OptimConfig


def measure(d_model: int, depth: int) -> dict[str, float]:
    config = ModelConfig(depth=depth, d_model=d_model, n_head=max(1, d_model // 64),
                         vocab_size=8192, sequence_len=256, n_loops=3)
    model = LoopedGPT.from_config(config, seed=0)
    optimizer = LoopedOptimizer(model, OptimConfig())
    x = torch.randint(0, config.vocab_size, (2, 64))
    model(x, x).backward()
    optimizer.step()  # so that the optimizer holds its state tensors
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = save_training_checkpoint(tmp, 1, model, meta={}, json_state={"step": 1},
                                          tensor_state={"optimizer": optimizer.state_dict()})
        save_s = time.perf_counter() - start
        size = sum((folder / name).stat().st_size for name in TRAIN_FILES)
        start = time.perf_counter()
        write_manifest(folder, TRAIN_FILES)  # the manifest's share of the save
        manifest_s = time.perf_counter() - start
        start = time.perf_counter()
        verify_checkpoint(folder, TRAIN_FILES)
        verify_s = time.perf_counter() - start
        start = time.perf_counter()
        load_training_state(folder)
        load_s = time.perf_counter() - start
    return {"params": model.num_params(), "mib": size / 2**20, "save_s": save_s,
            "manifest_s": manifest_s, "verify_s": verify_s, "load_s": load_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,256", help="comma list of d_model values")
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; folder: "
          f"{Path(tempfile.gettempdir())}")
    print(f"{'d_model':>8} {'params':>12} {'MiB':>8} {'save s':>8} {'manifest s':>11} "
          f"{'verify s':>9} {'load s':>8}")
    for d_model in (int(s) for s in args.sizes.split(",")):
        r = measure(d_model, args.depth)
        print(f"{d_model:>8} {r['params']:>12,} {r['mib']:>8.1f} {r['save_s']:>8.2f} "
              f"{r['manifest_s']:>11.2f} {r['verify_s']:>9.2f} {r['load_s']:>8.2f}")


if __name__ == "__main__":
    main()
