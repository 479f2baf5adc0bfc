"""`loopedlm tokenizer ...`: train and inspect tokenizers."""

from __future__ import annotations

import argparse
from typing import Any

from loopedlm.cli import add_command


def _cmd_train(args: argparse.Namespace) -> int:
    from loopedlm.data.tokenizer_training import split_compression, train_tokenizer_on_corpus

    tok, out = train_tokenizer_on_corpus(args.data, args.vocab_size, args.out,
                                         max_chars=args.max_chars)
    ratio = split_compression(tok, args.data, "val")
    print(f"saved a byte-level BPE of {tok.vocab_size} ids to {out}")
    print(f"compression on the validation shard: {ratio:.3f} bytes/token")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from loopedlm.data.tokenizer import load_tokenizer
    from loopedlm.data.tokenizer_training import split_compression

    tok = load_tokenizer(args.tokenizer)
    print(f"tokenizer:   {tok.name}")
    print(f"vocab size:  {tok.vocab_size}")
    print(f"BOS id:      {tok.bos_id} ({tok.decode([tok.bos_id])!r})")
    print(f"special ids: {len(tok.special_ids)}")
    if args.data:
        ratio = split_compression(tok, args.data, "val")
        print(f"compression on {args.data} (val): {ratio:.3f} bytes/token")
    return 0


def register(subparsers: Any) -> None:
    """Add `loopedlm tokenizer train|info` to the command line."""
    parser = add_command(subparsers, "tokenizer")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE on a Parquet corpus")
    train.add_argument("--data", required=True, help="folder of Parquet shards (`text` column)")
    train.add_argument("--vocab-size", type=int, required=True, help="ids incl. 256 bytes + BOS")
    train.add_argument("--out", required=True, help="folder to save the tokenizer into")
    train.add_argument("--max-chars", type=int, default=None,
                       help="train on at most this many characters")
    train.set_defaults(func=_cmd_train)
    info = sub.add_parser("info", help="describe a tokenizer (name or folder)")
    info.add_argument("tokenizer", help="'qwen3' or a tokenizer folder")
    info.add_argument("--data", default=None, help="also report compression on this corpus")
    info.set_defaults(func=_cmd_info)
