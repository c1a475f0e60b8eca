"""Conversations -> token ids with an assistant-only loss mask; packing; preference pairs.

Rendering goes through the tokenizer's own Jinja chat template (SmolLM2's, Llama's, or
chipshift's ChatML), so the ids are exactly what the model sees at inference. Which
characters belong to the assistant is found by rendering prefixes of the conversation:

    P = render(messages[:i], add_generation_prompt=True)   # everything before reply i
    F = render(messages[:i+1])                             # ... and reply i
    F starts with P; reply i is F[len(P):] up to and including the end-of-turn token

so the template's role headers, system prompt and separators never take loss, whatever
the template, and a template that is not prefix-stable is refused rather than guessed.
The whole conversation is then tokenised once, and a token is a target when it starts
inside an assistant span.

Conventions used by the training loop:
- `ChatExample.mask[t] == 1`: token t is a target (predicted from the tokens before it).
- `pack()` returns labels already shifted: `labels[t]` is the token to predict at
  position t, -100 where there is no loss, so the loss is `cross_entropy(logits, labels)`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from chipshift.data.tokenizer import Tokenizer
from chipshift.errors import ChipshiftError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100


@dataclass
class ChatExample:
    ids: list[int]
    mask: list[int]  # 1 where the token is a training target (assistant reply + end of turn)

    def __len__(self) -> int:
        return len(self.ids)


def check_messages(messages, where: str = "conversation") -> list[dict]:
    """OpenAI-style messages, checked: a non-empty list of {role, content} with known roles."""
    if not isinstance(messages, list) or not messages:
        raise ChipshiftError(f"{where}: expected a non-empty list of messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChipshiftError(f"{where}: message {i} must be an object with \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise ChipshiftError(f"{where}: message {i} has role {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ChipshiftError(f"{where}: message {i} content must be a string")
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


def _stop_strings(tok: Tokenizer) -> list[str]:
    return [s for s in (tok.tok.id_to_token(i) for i in tok.stop_ids()) if s]


def assistant_spans(tok: Tokenizer, messages: list[dict], only_last: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of the assistant
    replies that take loss (each reply's content and its end-of-turn token)."""
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    stops = _stop_strings(tok)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ChipshiftError("conversation has no assistant message to learn from")
    spans = []
    for i in turns[-1:] if only_last else turns:
        prefix = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not upto.startswith(prefix) or not text.startswith(upto):
            raise ChipshiftError("the chat template does not render conversations prefix by prefix; "
                                 "cannot tell the assistant's tokens apart")
        start = len(prefix)
        content_at = upto.find(messages[i]["content"], start)
        after = content_at + len(messages[i]["content"]) if content_at >= 0 else start
        ends = [pos + len(s) for s in stops if (pos := upto.find(s, after)) >= 0]
        spans.append((start, min(ends) if ends else len(upto.rstrip())))
    return text, spans


def encode_chats(tok: Tokenizer, conversations: list[list[dict]], only_last: bool = False) -> list[ChatExample]:
    """Token ids and loss masks of many conversations (all assistant replies, or only the
    last); the texts are tokenised in one parallel batch."""
    rendered = [assistant_spans(tok, check_messages(m, f"conversation {i}"), only_last)
                for i, m in enumerate(conversations)]
    encodings = tok.tok.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    examples = []
    for (_, spans), enc in zip(rendered, encodings):
        starts = [s for s, _ in spans]
        mask = []
        for begin, _ in enc.offsets:
            k = bisect.bisect_right(starts, begin) - 1
            mask.append(int(k >= 0 and begin < spans[k][1]))
        examples.append(ChatExample(list(enc.ids), mask))
    return examples


def encode_chat(tok: Tokenizer, messages: list[dict], only_last: bool = False) -> ChatExample:
    """Token ids of one conversation and its loss mask."""
    return encode_chats(tok, [messages], only_last)[0]


# -- packing -------------------------------------------------------------------------------
@dataclass
class Packed:
    input_ids: torch.Tensor    # (rows, seq_len) long
    labels: torch.Tensor       # (rows, seq_len) long, next token or -100
    positions: torch.Tensor    # (rows, seq_len) long, restarting at 0 for each example
    segment_ids: torch.Tensor  # (rows, seq_len) long, one id per example in a row (padding: its own)
    example_ids: torch.Tensor  # (rows, seq_len) long, index into the input list, -1 for padding
    truncated: int             # examples cut to seq_len


def example_labels(ex: ChatExample) -> list[int]:
    """Shifted labels of one example: labels[t] = ids[t+1] where that token is a target."""
    return [nxt if m else IGNORE_INDEX for nxt, m in zip(ex.ids[1:], ex.mask[1:])] + [IGNORE_INDEX]


def pack(examples: list[ChatExample], seq_len: int, pad_id: int) -> Packed:
    """Pack examples into rows of `seq_len` tokens (best fit: each example goes to the
    fullest row that still has room). Examples keep their own positions and segment, so
    with `segment_ids` passed to the model they neither attend to nor take loss from each
    other. Longer examples are cut to `seq_len`; examples left with no target are dropped."""
    if seq_len < 2:
        raise ChipshiftError(f"seq_len must be at least 2, got {seq_len}")
    rows: list[list[int]] = []     # example indices per row
    room: list[tuple[int, int]] = []  # sorted (free tokens, row)
    truncated = 0
    kept: dict[int, ChatExample] = {}
    for idx, ex in enumerate(examples):
        if len(ex) > seq_len:
            ex = ChatExample(ex.ids[:seq_len], ex.mask[:seq_len])
            truncated += 1
        if not any(ex.mask[1:]):
            continue
        kept[idx] = ex
        k = bisect.bisect_left(room, (len(ex), -1))
        if k == len(room):
            rows.append([idx])
            bisect.insort(room, (seq_len - len(ex), len(rows) - 1))
        else:
            free, row = room.pop(k)
            rows[row].append(idx)
            bisect.insort(room, (free - len(ex), row))
    shape = (len(rows), seq_len)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    example_ids = torch.full(shape, -1, dtype=torch.long)
    for r, members in enumerate(rows):
        t = 0
        for seg, idx in enumerate(members):
            ex = kept[idx]
            n = len(ex)
            input_ids[r, t:t + n] = torch.tensor(ex.ids)
            labels[r, t:t + n] = torch.tensor(example_labels(ex))
            positions[r, t:t + n] = torch.arange(n)
            segment_ids[r, t:t + n] = seg
            example_ids[r, t:t + n] = idx
            t += n
        positions[r, t:] = torch.arange(seq_len - t)
        segment_ids[r, t:] = len(members)
    return Packed(input_ids, labels, positions, segment_ids, example_ids, truncated)


# -- preference pairs ----------------------------------------------------------------------
@dataclass
class PreferencePair:
    prompt: list[dict]  # messages before the reply (ending with a user turn)
    chosen: str
    rejected: str


def _reply(value, prompt: list[dict] | None, key: str, where: str) -> tuple[list[dict], str]:
    """(prompt, reply text) from a reply given as a string, as [assistant message], or as a
    full conversation ending with the assistant's reply."""
    if isinstance(value, str):
        if prompt is None:
            raise ChipshiftError(f"{where}: \"{key}\" is a string, so a \"prompt\" is needed")
        return prompt, value
    msgs = check_messages(value, f"{where}: \"{key}\"")
    if msgs[-1]["role"] != "assistant":
        raise ChipshiftError(f"{where}: \"{key}\" must end with an assistant message")
    if prompt is not None and len(msgs) == 1:
        return prompt, msgs[0]["content"]
    if prompt is not None and msgs[:-1] != prompt:
        raise ChipshiftError(f"{where}: \"{key}\" repeats a conversation that differs from \"prompt\"")
    return msgs[:-1], msgs[-1]["content"]


def preference_pair(record, where: str = "record") -> PreferencePair:
    """Accepts {"prompt": messages | str, "chosen": str, "rejected": str}, the same with
    chosen/rejected as [assistant message], or Hugging Face-style full conversations
    {"chosen": [...messages], "rejected": [...messages]} sharing everything but the reply."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise ChipshiftError(f"{where}: expected an object with \"chosen\" and \"rejected\"")
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif prompt is not None:
        prompt = check_messages(prompt, f"{where}: \"prompt\"")
    p1, chosen = _reply(record["chosen"], prompt, "chosen", where)
    p2, rejected = _reply(record["rejected"], prompt, "rejected", where)
    if p1 != p2:
        raise ChipshiftError(f"{where}: \"chosen\" and \"rejected\" continue different conversations")
    if not p1 or p1[-1]["role"] == "assistant":
        raise ChipshiftError(f"{where}: the prompt must end with a user (or system) message")
    return PreferencePair(p1, chosen, rejected)


def encode_preference(tok: Tokenizer, pair: PreferencePair) -> tuple[ChatExample, ChatExample]:
    """(chosen, rejected) examples; each masks only its final reply."""
    chosen, rejected = encode_chats(tok, [pair.prompt + [{"role": "assistant", "content": reply}]
                                          for reply in (pair.chosen, pair.rejected)], only_last=True)
    return chosen, rejected
