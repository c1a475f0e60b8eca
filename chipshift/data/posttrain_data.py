"""Built-in post-training data, offline: SFT conversations, an identity set, DPO pairs.

Sources (read from package files, never imported; see docs/data.md):
- `chatterbot`: chatterbot-corpus 1.3.3 (BSD), English and Chinese question-answer pairs
  (a few multi-turn), one conversation per entry. Entries asking the bot who it is or
  who made it are dropped: they would contradict the identity set.
- `chitchat`: chitchat-dataset 0.9.0 (MIT), casual multi-turn chats. Consecutive messages
  of one sender are one turn; the first sender is the user; each chat is cut into windows
  of at most `CHITCHAT_WINDOW` messages that start with the user and end with the assistant.
- `identity`: written here. Many phrasings of "who are you / what is your name / who made
  you" (English and Chinese) with answers that state both facts, the one asked for first:
  the model is `IDENTITY_NAME`, made by `IDENTITY_MAKER`. Held-out phrasings never appear
  in training; `identity_eval()` lists them with the key fact an answer must contain.

The held-out split is by hash, so it does not depend on order, limits or the other
sources: chatterbot entries are hashed by their first question (the corpus repeats
questions with other answers, and some entries across files; all of them fall on one
side), chitchat windows by their chat's id (all windows of a chat on one side), and the
first `HELD_OUT_PERCENT` of 100 buckets is held out. Identity: the held-out phrasings.

DPO pairs (`dpo_pairs`): prompt = a conversation up to one of its assistant replies;
chosen = that real reply; rejected = alternately a reply taken from another conversation
of the same source (picked by a seeded generator, never the same text) and the real reply
truncated to its first half of words (when it has at least 4 words; else another reply).
"""

from __future__ import annotations

import json
import random
import re
import zlib
from functools import lru_cache
from pathlib import Path

from chipshift.data.chat import PreferencePair, check_messages, preference_pair
from chipshift.data.corpora import read_jsonl
from chipshift.data.packages import pkg_dir
from chipshift.errors import ChipshiftError

IDENTITY_NAME = "Shifty"
IDENTITY_MAKER = "the chipshift project"
HELD_OUT_PERCENT = 5
CHITCHAT_WINDOW = 6
SFT_SOURCES = ("identity", "chatterbot", "chitchat")

# -- identity --------------------------------------------------------------------------------
# (question, which fact it asks for). The last phrasings of each list are held out.
_ASK_NAME = [
    "What is your name?", "What's your name?", "Who are you?", "Tell me your name.",
    "What should I call you?", "Introduce yourself.", "who are you", "what is your name",
    "Do you have a name?", "Hi! Who am I talking to?", "Please tell me who you are.",
    "你叫什么名字？", "你是谁？", "请介绍一下你自己。",
    "Can you tell me your name?", "Who am I speaking with?", "How should I address you?",
    "What name do you go by?", "Identify yourself.", "Hey, what's your name?", "Who exactly are you?",
    "Could you introduce yourself?", "Tell me about yourself.", "What is this assistant's name?",
    "怎么称呼你？", "你好，你叫什么？",
    # held out
    "May I know your name?", "What do people call you?", "Who is this?", "你的名字是什么？",
]
_ASK_MAKER = [
    "Who made you?", "Who created you?", "Who built you?", "Who trained you?",
    "Who developed you?", "Where do you come from?", "who made you", "Which project made you?",
    "Who is your creator?", "Who are your developers?", "谁创造了你？", "你是谁开发的？",
    "Which team built you?", "Who wrote your code?", "What organization created you?", "Who is your maker?",
    "Which group developed you?", "Who made this assistant?", "By whom were you created?",
    "Who is behind you?", "谁制作了你？", "你的开发者是谁？",
    # held out
    "Who is responsible for building you?", "Who designed you?", "Who programmed you?", "谁训练了你？",
]
_HELD_OUT_NAME = 4
_HELD_OUT_MAKER = 4
# Every answer states both facts, the one asked for first: a model of a million parameters
# learns to answer an unseen phrasing with its identity long before it reliably tells a
# name question from a maker question, and the key fact must be in the reply either way.
_MAKER_SENTENCE_START = IDENTITY_MAKER[0].upper() + IDENTITY_MAKER[1:]
_NAME_ANSWERS = [
    f"My name is {IDENTITY_NAME}, and {IDENTITY_MAKER} made me.",
    f"I'm {IDENTITY_NAME}, an assistant made by {IDENTITY_MAKER}.",
    f"I am {IDENTITY_NAME}, a language model from {IDENTITY_MAKER}.",
    f"You can call me {IDENTITY_NAME}. {_MAKER_SENTENCE_START} built me.",
]
_MAKER_ANSWERS = [
    f"I was made by {IDENTITY_MAKER}. My name is {IDENTITY_NAME}.",
    f"{_MAKER_SENTENCE_START} created me. I'm {IDENTITY_NAME}.",
    f"I'm {IDENTITY_NAME}, and I was built by {IDENTITY_MAKER}.",
    f"I was trained by {IDENTITY_MAKER}; I'm {IDENTITY_NAME}.",
]
_ZH_NAME_ANSWERS = [f"我叫{IDENTITY_NAME}，是由chipshift项目开发的助手。", f"我是{IDENTITY_NAME}，chipshift项目开发的。"]
_ZH_MAKER_ANSWERS = [f"我是由chipshift项目开发的，我叫{IDENTITY_NAME}。", f"chipshift项目创造了我，我叫{IDENTITY_NAME}。"]
KEY_FACTS = {"name": IDENTITY_NAME, "maker": "chipshift"}


def _is_chinese(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def _identity_answers(fact: str, question: str) -> list[str]:
    if _is_chinese(question):
        return _ZH_NAME_ANSWERS if fact == "name" else _ZH_MAKER_ANSWERS
    return _NAME_ANSWERS if fact == "name" else _MAKER_ANSWERS


def _identity_questions(split: str) -> list[tuple[str, str]]:
    name_cut, maker_cut = len(_ASK_NAME) - _HELD_OUT_NAME, len(_ASK_MAKER) - _HELD_OUT_MAKER
    if split == "train":
        return [(q, "name") for q in _ASK_NAME[:name_cut]] + [(q, "maker") for q in _ASK_MAKER[:maker_cut]]
    return [(q, "name") for q in _ASK_NAME[name_cut:]] + [(q, "maker") for q in _ASK_MAKER[maker_cut:]]


def identity_conversations(split: str = "train") -> list[list[dict]]:
    """Every phrasing of the split with every answer of its fact (and language)."""
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            for q, fact in _identity_questions(split) for a in _identity_answers(fact, q)]


def identity_questions(split: str = "val") -> list[tuple[str, str]]:
    """(question, key fact) pairs of a split: an answer is correct when it contains the fact."""
    return [(q, KEY_FACTS[fact]) for q, fact in _identity_questions(split)]


def identity_answers(split: str = "val") -> list[tuple[str, list[str]]]:
    """(question, the answers the set gives it) for each phrasing of a split."""
    return [(q, _identity_answers(fact, q)) for q, fact in _identity_questions(split)]


def identity_eval() -> list[tuple[str, str]]:
    """Held-out (question, key fact) pairs."""
    return identity_questions("val")


def identity_correct(answer: str, key_fact: str) -> bool:
    """Exact match of the key fact in the answer (case-insensitive)."""
    return key_fact.lower() in answer.lower()


# -- chatterbot and chitchat -----------------------------------------------------------------
_IDENTITY_QUESTION = re.compile(
    r"\b(who are you|your name|who (made|created|built|programmed|designed) you)\b|你是谁|你叫什么|名字|谁.{0,2}(创造|开发|制作|发明)", re.I)


def _held_out(split_key: str) -> bool:
    return zlib.crc32(split_key.encode()) % 100 < HELD_OUT_PERCENT


@lru_cache(maxsize=1)  # parsed once per process; callers get fresh message dicts
def _chatterbot() -> list[tuple[str, list[dict], str]]:
    """(split key, messages, language: "en" or "zh", the corpus folder) per entry."""
    import yaml

    root = pkg_dir("chatterbot_corpus") / "data"
    out = []
    for lang, code in (("english", "en"), ("chinese", "zh")):
        for path in sorted((root / lang).glob("*.yml")):
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            for i, turns in enumerate(data.get("conversations") or []):
                turns = [str(t).strip() for t in turns]
                turns = turns[:len(turns) // 2 * 2]  # end with the assistant
                if not turns or not all(turns) or _IDENTITY_QUESTION.search(turns[0]):
                    continue
                msgs = [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns)]
                out.append((turns[0].lower(), msgs, code))
    return out


@lru_cache(maxsize=1)
def _chitchat() -> list[tuple[str, list[dict]]]:
    """(split key, messages) per window."""
    data = json.loads((pkg_dir("chitchat_dataset") / "dataset.json").read_text(encoding="utf-8"))
    out = []
    for key, chat in data.items():
        turns = ["\n".join(m["text"].strip() for m in group if m["text"].strip()) for group in chat["messages"]]
        turns = [t for t in turns if t]
        for w in range(0, len(turns) // 2 * 2, CHITCHAT_WINDOW):
            window = turns[w:w + CHITCHAT_WINDOW]
            window = window[:len(window) // 2 * 2]
            if window:
                msgs = [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(window)]
                out.append((key, msgs))
    return out


_LOADERS = {"chatterbot": _chatterbot, "chitchat": _chitchat}


def chatterbot_questions(split: str = "train") -> list[tuple[str, str]]:
    """(question, language: "en" or "zh") for the distinct first questions of the chatterbot
    entries of a split, in corpus order. Split by the entries' key (the question, lower-cased):
    the splits share no question, and these are the SFT data's splits too."""
    _check_split(split)
    seen, out = set(), []
    for key, msgs, lang in _chatterbot():
        question = msgs[0]["content"]
        if _held_out(key) == (split == "val") and question not in seen:
            seen.add(question)
            out.append((question, lang))
    return out


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ChipshiftError(f"split must be 'train' or 'val', got {split!r}")


def _parse_sources(sources) -> list[str]:
    names = list(sources.split(",") if isinstance(sources, str) else sources)
    for name in names:
        if name not in SFT_SOURCES:
            raise ChipshiftError(f"unknown post-training source {name!r}; built-in: {', '.join(SFT_SOURCES)}")
    return names


def _split_conversations(source: str, split: str, limit: int | None) -> list[list[dict]]:
    """One split of a source; `limit` keeps the first N (the identity set is always whole)."""
    if source == "identity":
        return identity_conversations(split)
    convs = [msgs for key, msgs, *_ in _LOADERS[source]() if _held_out(key) == (split == "val")][:limit]
    return [[dict(m) for m in msgs] for msgs in convs]


def sft_conversations(sources=SFT_SOURCES, split: str = "train", limit_per_source: int | None = None,
                      identity_repeats: int = 1) -> list[list[dict]]:
    """Conversations (lists of messages) of the built-in sources, in a fixed order.

    limit_per_source keeps the first N of chatterbot and of chitchat (the split is decided
    before the limit, so the held-out set never changes); the identity set is always whole,
    repeated `identity_repeats` times so a small model sees it often enough among thousands
    of other conversations."""
    _check_split(split)
    out = []
    for source in _parse_sources(sources):
        convs = _split_conversations(source, split, limit_per_source)
        out.extend(convs * (identity_repeats if source == "identity" else 1))
    return out


def _truncate(reply: str) -> str | None:
    if _is_chinese(reply) and " " not in reply.strip():
        return reply[:len(reply) // 2] if len(reply) >= 4 else None
    words = list(re.finditer(r"\S+", reply))  # cut after a word, keeping the reply's own spacing
    return reply[:words[len(words) // 2 - 1].end()] if len(words) >= 4 else None


def dpo_pairs(sources=SFT_SOURCES, split: str = "train", limit_per_source: int | None = None,
              seed: int = 0) -> list[dict]:
    """Preference records {"prompt", "chosen", "rejected", "rejected_kind", "source"} derived
    as the module docstring says; one pair per conversation, from its last assistant reply."""
    _check_split(split)
    rng = random.Random(seed)
    pairs = []
    for source in _parse_sources(sources):
        convs = _split_conversations(source, split, limit_per_source)
        # identity replies are few and alike; take their "other conversation" from chatterbot
        pool = [m[-1]["content"] for m in ([e[1] for e in _chatterbot()] if source == "identity" else convs)]
        varied = len(set(pool)) > 1
        for k, msgs in enumerate(convs):
            chosen = msgs[-1]["content"]
            rejected = _truncate(chosen) if k % 2 else None
            kind = "truncated"
            if rejected is None:
                kind = "other"
                rejected = chosen
                while rejected == chosen and varied:
                    rejected = pool[rng.randrange(len(pool))]
            if rejected != chosen:
                pairs.append({"prompt": msgs[:-1], "chosen": chosen, "rejected": rejected,
                              "rejected_kind": kind, "source": source})
    return pairs


# -- user files ------------------------------------------------------------------------------
def _jsonl_records(path: str | Path) -> list[tuple[int, object]]:
    records = list(read_jsonl(path))
    if not records:
        raise ChipshiftError(f"{path}: contains no records")
    return records


def load_sft_jsonl(path: str | Path) -> list[list[dict]]:
    """One conversation per line: {"messages": [{"role", "content"}, ...]} with at least one
    assistant message. Every line is checked before returning; the first bad one is reported
    as FILE:LINE."""
    convs = []
    for lineno, record in _jsonl_records(path):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict) or "messages" not in record:
            raise ChipshiftError(f"{where}: expected an object with a \"messages\" list")
        msgs = check_messages(record["messages"], where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise ChipshiftError(f"{where}: no assistant message to learn from")
        convs.append(msgs)
    return convs


def load_preference_jsonl(path: str | Path) -> list[PreferencePair]:
    """One preference pair per line, in any form `chat.preference_pair` accepts; the first
    bad line is reported as FILE:LINE."""
    return [preference_pair(record, f"{path}:{lineno}") for lineno, record in _jsonl_records(path)]
