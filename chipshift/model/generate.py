"""The naive reference generator: no KV cache, the whole sequence recomputed every step.

It is slow on purpose and obviously correct; the fast inference engine must reproduce
its tokens one for one. The contract both follow:

  - each step runs the model on prompt + tokens so far and takes the logits of the last
    position, in float32;
  - `temperature == 0` is greedy (`argmax`, the first index on ties);
  - otherwise `sample_next`: divide by temperature, keep the top_k logits, keep the
    smallest set of tokens whose probability reaches top_p, then one `torch.multinomial`
    draw from a generator seeded once with `seed`;
  - generation stops after a token in `stop_ids` (which is returned), after
    `max_new_tokens`, or when the sequence reaches the model's `max_seq_len`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from chipshift.model.transformer import Transformer


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """The next token from one position's logits (vocab,)."""
    logits = logits.float()
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def iter_naive(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None, stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield new tokens one at a time (see the module docstring for the rules)."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    device = model.output_weight.device
    generator = None
    if temperature > 0.0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    stop = set(stop_ids)
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        if len(ids) >= model.cfg.max_seq_len:
            return
        logits = model(torch.tensor([ids], device=device))[0, -1]
        token = sample_next(logits, temperature, top_k, top_p, generator)
        ids.append(token)
        yield token
        if token in stop:
            return


def generate_naive(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, stop_ids: Iterable[int] = ()) -> list[int]:
    """The new token ids (not the prompt), ending with the stop id when one was produced."""
    return list(iter_naive(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, stop_ids=stop_ids))


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Prompt ids: through the tokenizer's chat template as one user turn, or as plain text."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tokenizer.encode(text)
    return tokenizer.encode(prompt, add_special_tokens=True)


def stream_text(tok, tokens) -> str:
    """Print tokens as text while they arrive; return the whole text."""
    new: list[int] = []
    shown = ""
    for token in tokens:
        new.append(token)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tok.decode(new)[len(shown):], flush=True)
    return tok.decode(new)
