"""Verifiable tasks and reward functions for GRPO, offline.

A task is a source of `Problem`s (a prompt and the expected answer) with a train split
and a held-out split that are disjoint by construction, and the reward functions it is
scored with by default. A reward function is any plain Python callable

    reward(prompt: str, completion: str, answer: str) -> float

and a config names it as a built-in (`REWARDS`), "package.module:function" or
"path/to/file.py:function". The reward of a completion is the sum of its functions.

Built-in tasks:
  arithmetic         "What is 347 + 86?": addition and subtraction of numbers of up to
                     `digits` digits, exact integer answer; reward `arithmetic_correct`.
                     A problem is held out when the crc32 of its text falls in the
                     held-out fifth; the train split draws only the others, so no
                     held-out problem is ever trained on, whatever the seed or the step.
  arithmetic_tagged  the same problems, asking for the answer inside <answer></answer>;
                     rewards `tagged_answer_correct` (the number inside the tag) and
                     `answer_tag` (0.5 for one well-formed tag, a formatting rule).
  identity           the identity questions of `chipshift.data.posttrain_data` ("Who made
                     you?"; held-out phrasings are never trained on); reward
                     `identity_fact` (the key fact, the name or the maker, in the reply).
  language           the chatterbot corpus's questions, English and Chinese alternating
                     (its split: no question on both sides); reward `same_language`
                     (the reply is written in the question's script, a formatting rule
                     any task's config can add).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chipshift.errors import ChipshiftError, ConfigError

Reward = Callable[[str, str, str], float]
HELD_OUT_FIFTHS = 1  # arithmetic problems whose crc32 % 5 is below this are held out
_INT = re.compile(r"-?\d+")
_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


# -- reward functions ---------------------------------------------------------------------------
def _last_int(text: str) -> str | None:
    found = _INT.findall(text.replace(",", ""))
    return found[-1] if found else None


def arithmetic_correct(prompt: str, completion: str, answer: str) -> float:
    """1 when the last integer in the reply is the answer."""
    return float(_last_int(completion) == answer)


def tagged_answer_correct(prompt: str, completion: str, answer: str) -> float:
    """1 when the integer inside the first <answer>...</answer> is the answer."""
    tag = _TAG.search(completion)
    return float(tag is not None and _last_int(tag.group(1)) == answer)


def answer_tag(prompt: str, completion: str, answer: str) -> float:
    """0.5 when the reply holds exactly one well-formed <answer>...</answer>."""
    return 0.5 * (len(_TAG.findall(completion)) == 1 and completion.count("<answer>") == 1)


def identity_fact(prompt: str, completion: str, answer: str) -> float:
    """1 when the reply names the key fact (case-insensitive)."""
    from chipshift.data.posttrain_data import identity_correct
    return float(identity_correct(completion, answer))


def script_language(text: str) -> str | None:
    """"zh" when the text's Han characters outnumber its Latin-script words, "en" when the
    words outnumber the characters, None on a tie (no letters at all included). A Han
    character and a Latin word count alike, each about a word's worth: "我是SmolLM" is
    Chinese with a name in it, "the word 你好 means hello" English with a quotation."""
    han, latin = len(_HAN.findall(text)), len(_LATIN_WORD.findall(text))
    return "zh" if han > latin else "en" if latin > han else None


def same_language(prompt: str, completion: str, answer: str) -> float:
    """1 when the reply is in the question's language (`script_language` of each, Chinese or
    English); 0 when the question or the reply has none."""
    language = script_language(prompt)
    return float(language is not None and script_language(completion) == language)


REWARDS: dict[str, Reward] = {f.__name__: f for f in (arithmetic_correct, tagged_answer_correct, answer_tag,
                                                      identity_fact, same_language)}


# -- tasks ---------------------------------------------------------------------------------------
class Arithmetic:
    """Addition and subtraction with exact answers; see the module docstring."""

    def __init__(self, digits: int = 2, tagged: bool = False) -> None:
        self.digits, self.tagged = digits, tagged
        self.rewards = ["tagged_answer_correct", "answer_tag"] if tagged else ["arithmetic_correct"]

    def _draw(self, rng: random.Random) -> tuple[Problem, bool]:
        top = 10 ** self.digits - 1
        a, b, op = rng.randint(0, top), rng.randint(0, top), rng.choice("+-")
        question = f"What is {a} {op} {b}?"
        held_out = zlib.crc32(question.encode()) % 5 < HELD_OUT_FIFTHS
        ask = (" Put the final answer inside <answer></answer>." if self.tagged else
               " Reply with the number only.")
        return Problem(question + ask, str(a + b if op == "+" else a - b)), held_out

    def train_problem(self, seed: int, index: int) -> Problem:
        """The `index`-th training problem of a run: a pure function of (seed, index)."""
        rng = random.Random(f"arithmetic-{self.digits}-{seed}-{index}")
        while True:
            problem, held_out = self._draw(rng)
            if not held_out:
                return problem

    def held_out(self, n: int) -> list[Problem]:
        """The first n distinct held-out problems of a fixed draw (the same for every run)."""
        rng, seen, out = random.Random(f"arithmetic-{self.digits}-held-out"), set(), []
        for _ in range(100 * n + 10_000):  # one-digit operands hold only about 40
            problem, held_out = self._draw(rng)
            if held_out and problem.prompt not in seen:
                seen.add(problem.prompt)
                out.append(problem)
                if len(out) == n:
                    return out
        raise ConfigError(f"grpo.eval_problems = {n}: {self.digits}-digit arithmetic holds only {len(out)} "
                          f"held-out problems; lower it or raise grpo.digits")


def cycle_shuffled(pool: list[Problem], name: str, seed: int, index: int) -> Problem:
    """The `index`-th draw of passes through `pool`, each pass a seeded shuffle."""
    epoch, i = divmod(index, len(pool))
    return pool[random.Random(f"{name}-{seed}-{epoch}").sample(range(len(pool)), len(pool))[i]]


class Identity:
    """The identity questions; the train split cycles through its phrasings."""

    rewards = ["identity_fact"]

    def __init__(self) -> None:
        from chipshift.data.posttrain_data import identity_questions
        self.train = [Problem(q, fact) for q, fact in identity_questions("train")]
        self.val = [Problem(q, fact) for q, fact in identity_questions("val")]

    def train_problem(self, seed: int, index: int) -> Problem:
        return cycle_shuffled(self.train, "identity", seed, index)

    def held_out(self, n: int) -> list[Problem]:
        return self.val[:n]


class ReplyLanguage:
    """Questions to answer in their own language: the chatterbot corpus's, English and
    Chinese, each a problem whose answer is its language ("en", "zh"). Only questions whose
    script agrees with their corpus folder are kept, so `same_language` judges by the
    question. Problems alternate Chinese, English (Chinese is a fifth of the corpus)."""

    rewards = ["same_language"]
    LANGUAGES = ("zh", "en")

    def __init__(self) -> None:
        from chipshift.data.posttrain_data import chatterbot_questions
        self.train, self.val = ({lang: [Problem(q, lang) for q, qlang in chatterbot_questions(split)
                                        if qlang == lang and script_language(q) == lang]
                                 for lang in self.LANGUAGES} for split in ("train", "val"))

    def train_problem(self, seed: int, index: int) -> Problem:
        lang = self.LANGUAGES[index % 2]
        return cycle_shuffled(self.train[lang], f"language-{lang}", seed, index // 2)

    def held_out(self, n: int) -> list[Problem]:
        """Chinese and English alternating while both last, then the rest."""
        zh, en = self.val["zh"], self.val["en"]
        k = min(len(zh), len(en))
        out = [p for pair in zip(zh, en) for p in pair] + zh[k:] + en[k:]
        if n > len(out):
            raise ConfigError(f"grpo.eval_problems = {n}: the language task holds only {len(out)} held-out "
                              "questions; lower it")
        return out[:n]


TASKS = ("arithmetic", "arithmetic_tagged", "identity", "language")


def build_task(name: str, digits: int = 2):
    if name == "arithmetic":
        return Arithmetic(digits)
    if name == "arithmetic_tagged":
        return Arithmetic(digits, tagged=True)
    if name == "identity":
        return Identity()
    if name == "language":
        return ReplyLanguage()
    raise ConfigError(f"grpo.task = {name!r}: choose from {', '.join(TASKS)}")


# -- user reward functions -----------------------------------------------------------------------
def load_reward(spec: str, key: str = "grpo.rewards") -> Reward:
    """A built-in name, "package.module:function" or "path/to/file.py:function"."""
    if spec in REWARDS:
        return REWARDS[spec]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(f"{key}: {spec!r} is neither a built-in ({', '.join(REWARDS)}) nor "
                          f"'module:function' / 'file.py:function'")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"{key}: {spec!r}: no file {where}")
            module_spec = importlib.util.spec_from_file_location(f"chipshift_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{key}: {spec!r}: importing {where} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{key}: {spec!r}: {where} has no callable {name}")
    fn.reward_name = spec
    return fn


def score(fn: Reward, problem: Problem, completion: str) -> float:
    """fn's reward as a finite float; a reward that raises or returns anything else stops the
    run with an error naming the function and the completion."""
    name = getattr(fn, "reward_name", getattr(fn, "__name__", repr(fn)))
    try:
        value = fn(problem.prompt, completion, problem.answer)
    except Exception as exc:
        raise ChipshiftError(f"reward {name} raised {type(exc).__name__}: {exc} on the completion "
                             f"{completion!r} (prompt {problem.prompt!r})") from exc
    if not isinstance(value, (int, float)) or not math.isfinite(value):  # bool counts as 0/1
        raise ChipshiftError(f"reward {name} returned {value!r}, not a finite number, on the completion "
                             f"{completion!r} (prompt {problem.prompt!r})")
    return float(value)
