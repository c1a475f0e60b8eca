"""`chipshift demo`: the main job, as `make demo` runs it on a fresh machine.

It is `chipshift run` on the shipped recipe recipes/demo.toml: train the tokenizer on the
built-in English and Chinese corpora, pre-train a small model (float32), SFT and DPO
(bfloat16, after a verified handoff), evaluate before and after, serve the result and ask
it a few questions through the OpenAI-compatible API. Running it again resumes. The real
SmolLM2-135M-Instruct, post-trained with LoRA and exported, is `chipshift run smollm2`.
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="run the demo recipe: tokenizer, pre-training, SFT, DPO, evaluation, serving (resumable)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  chipshift demo\n  chipshift demo --set stages.pretrain.train.steps=100\n"
               "  chipshift run recipes/demo.toml      # the same, by its recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set stages.sft.train.steps=60 (repeatable)")
    p.add_argument("--force", action="store_true", help="continue past a failed handoff")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run, recipe="demo", check=False)


def answer(model, tokenizer, question: str, max_new_tokens: int = 40, stream: bool = False) -> str:
    """A model's greedy chat answer to one question (printed as it is generated if `stream`)."""
    from chipshift.model.generate import encode_prompt, iter_naive, stream_text

    ids = encode_prompt(tokenizer, question, chat=True)
    tokens = iter_naive(model, ids, max_new_tokens, stop_ids=tokenizer.stop_ids())
    if stream:
        return stream_text(tokenizer, tokens)
    return tokenizer.decode(list(tokens))


def run(args) -> int:
    from chipshift.pipeline.cli import cmd_run
    return cmd_run(args)
