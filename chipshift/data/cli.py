"""`chipshift tokenizer train` and `chipshift data prepare`."""

from __future__ import annotations

import argparse
import json

from chipshift.data.corpora import BUILTIN_SOURCES, DEFAULT_VAL_FRACTION, load_corpora

SOURCES_HELP = (f"comma-separated built-in sources: {', '.join(BUILTIN_SOURCES)} "
                "(State of the Union addresses, Shakespeare's plays, 三国演义)")
FILES_HELP = ("your own text files: .txt (one document per file), .jsonl (a \"text\" field per "
              "line), .parquet (a \"text\" column)")


def _add_inputs(p: argparse.ArgumentParser, default_sources: str) -> None:
    p.add_argument("--sources", default=default_sources, help=f"{SOURCES_HELP}; default: %(default)s; "
                   "pass --sources '' to use only --files")
    p.add_argument("--files", nargs="+", default=[], metavar="FILE", help=FILES_HELP)
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="share of each source's documents held out for validation, the last ones in "
                        "order (a single-document source holds out its tail); default: %(default)s")


def cmd_tokenizer_train(args) -> int:
    from chipshift.data.tokenizer import Tokenizer
    from chipshift.data.tokenizer_train import compression, train_and_save

    corpora = load_corpora(args.sources.split(",") if args.sources else [], args.files, args.val_fraction)
    texts = [d.text for train, _ in corpora.values() for d in train]
    print(f"training a {args.vocab_size}-token byte-level BPE on {sum(map(len, texts)):,} characters "
          f"from {', '.join(corpora)}")
    summary = train_and_save(texts, args.vocab_size, args.out,
                             {"sources": list(corpora), "val_fraction": args.val_fraction})
    tok = Tokenizer.load(args.out)
    held_out = {name: compression(tok, [d.text for d in val]) for name, (_, val) in corpora.items() if val}
    print(f"saved {args.out} in {summary['train_seconds']} s (vocab {summary['vocab_size']}, "
          f"sha256 {summary['sha256'][:12]})")
    for name, stats in held_out.items():
        cjk = f", {stats['tokens_per_cjk_char']} tokens per Chinese character" if "tokens_per_cjk_char" in stats else ""
        print(f"  held-out {name}: {stats['chars_per_token']} characters per token{cjk}")
    print(json.dumps({**summary, "held_out": held_out}, ensure_ascii=False))
    return 0


def cmd_data_prepare(args) -> int:
    from chipshift.data.shards import prepare

    index = prepare(args.tokenizer, args.out, args.sources.split(",") if args.sources else [],
                    args.files, args.val_fraction)
    for split, info in index["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens in {info['documents']} documents -> {args.out}/{info['file']}")
    for name, counts in index["sources"].items():
        print(f"  {name}: " + ", ".join(f"{s} {c['tokens']:,} tokens / {c['documents']} docs"
                                        for s, c in counts.items()))
    print(f"{index['chars']:,} characters in {index['seconds']} s, dtype {index['dtype']}")
    return 0


def register(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer with chat tokens",
                         description="Tokenizer commands.")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    train = tok_sub.add_parser(
        "train", help="train a byte-level BPE tokenizer on the built-in corpora and/or your files",
        description="Train a lossless byte-level BPE tokenizer (Hugging Face `tokenizers`) with "
                    "<|endoftext|>, <|im_start|>, <|im_end|> reserved and a ChatML chat template; "
                    "the output directory loads with transformers.AutoTokenizer. Prints the "
                    "compression on each source's held-out documents.")
    train.add_argument("--vocab-size", type=int, default=16384, help="default: %(default)s")
    train.add_argument("--out", required=True, help="output directory (tokenizer.json, tokenizer_config.json)")
    _add_inputs(train, ",".join(BUILTIN_SOURCES))
    train.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="tokenise corpora into memory-mapped shards",
                          description="Data commands.")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    prep = data_sub.add_parser(
        "prepare", help="tokenise corpora into train/val shards with an index",
        description="Tokenise built-in corpora and/or your files (in parallel) into flat "
                    "uint16/uint32 memory-mapped shards train.bin and val.bin, documents "
                    "separated by eos, plus index.json (tokenizer hash, dtype, counts per split "
                    "and per source).")
    prep.add_argument("--tokenizer", required=True, help="tokenizer directory (or a checkpoint directory)")
    prep.add_argument("--out", required=True, help="output data directory")
    _add_inputs(prep, ",".join(BUILTIN_SOURCES))
    prep.set_defaults(func=cmd_data_prepare)
