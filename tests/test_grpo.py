"""GRPO: the loss and advantages by hand on a group of 4, zero gradient for equal rewards,
tasks with disjoint splits, reward errors, and rollouts from the engine that match the
trainer's log-probabilities on a tiny model."""

import copy
import math

import pytest
import torch
from test_posttrain import model, tok, tok_dir  # noqa: F401 (fixtures)

from chipshift.errors import ChipshiftError, ConfigError
from chipshift.devices import get_device
from chipshift.model.lora import LoRAConfig, apply_lora
from chipshift.model.transformer import build_model
from chipshift.train.grpo import GRPO, Rollouts, Sampler, group_advantages, grpo_loss, informative_first
from chipshift.train.rewards import (Arithmetic, Identity, Problem, ReplyLanguage, answer_tag, arithmetic_correct,
                                     build_task, load_reward, same_language, score, script_language,
                                     tagged_answer_correct)

REWARDS = [1.0, 0.0, 0.0, 1.0]
# two completion tokens per completion: (logp, old_logp, ref_logp)
TOKENS = [[(-1.0, -1.1, -0.9), (-2.0, -2.0, -2.5)],
          [(-0.5, -0.2, -0.6), (-1.5, -1.6, -1.5)],
          [(-3.0, -3.0, -2.0), (-0.1, -0.3, -0.2)],
          [(-0.7, -0.9, -0.7), (-1.2, -1.0, -1.3)]]


def by_hand(eps, beta):
    mean = sum(REWARDS) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in REWARDS) / 3)
    total, n = 0.0, 0
    for r, toks in zip(REWARDS, TOKENS):
        a = (r - mean) / (std + 1e-4)
        for lp, old, ref in toks:
            ratio = math.exp(lp - old)
            surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            kl = math.exp(ref - lp) - (ref - lp) - 1
            total += -surrogate + beta * kl
            n += 1
    return total / n


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_advantages_by_hand(beta):
    adv = group_advantages(torch.tensor([REWARDS], dtype=torch.float64))
    assert adv[0].tolist() == pytest.approx([0.5 / (math.sqrt(1 / 3) + 1e-4) * s for s in (1, -1, -1, 1)])
    flat = torch.tensor([t for toks in TOKENS for t in toks], dtype=torch.float64)
    logp = flat[:, 0].clone().requires_grad_()
    per_token_adv = adv[0].repeat_interleave(2)
    loss, metrics = grpo_loss(logp, flat[:, 1], per_token_adv, 0.2, beta, flat[:, 2])
    assert loss.item() == pytest.approx(by_hand(0.2, beta), abs=1e-12)
    assert ("kl" in metrics) == bool(beta)
    # the clip is active on the tokens whose ratio left [0.8, 1.2] in the advantage's direction
    ratio = (flat[:, 0] - flat[:, 1]).exp()
    active = [(r > 1.2 and a > 0) or (r < 0.8 and a < 0) for r, a in zip(ratio.tolist(), per_token_adv.tolist())]
    assert metrics["clip_frac"].item() == pytest.approx(sum(active) / 8) and any(active)
    loss.backward()
    # unclipped tokens: d/dlogp = (-A ratio + beta (1 - exp(ref - logp))) / N; clipped ones: beta part only
    columns = (logp.grad, ratio, per_token_adv, flat[:, 2], flat[:, 0])
    for k, (g, r, a, ref, lp) in enumerate(zip(*(c.tolist() for c in columns))):
        expected = (0 if active[k] else -a * r) + beta * (1 - math.exp(ref - lp))
        assert g == pytest.approx(expected / 8, abs=1e-12)


def test_equal_rewards_give_zero_advantage_and_zero_gradient(tok, model):  # noqa: F811
    adv = group_advantages(torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    assert torch.equal(adv, torch.zeros(1, 4))
    m = build_model(model.cfg, seed=3)
    ids = torch.tensor([tok.encode("who made you? me")] * 4)
    labels = torch.full_like(ids, -100)
    labels[:, 3:-1] = ids[:, 4:]
    with torch.no_grad():
        from chipshift.train.posttrain import target_logps
        logp, _ = target_logps(m, {"input_ids": ids, "labels": labels})
    lp = torch.zeros(ids.shape)
    lp[labels != -100] = logp
    batch = {"input_ids": ids, "labels": labels, "rollout_logps": lp - 0.05, "ref_logps": lp,
             "advantages": adv.flatten(), "rewards": torch.full((4,), 0.5), "group_std": torch.zeros(4),
             "truncated": torch.zeros(4),
             "completion_len": torch.full((4,), 3), "num_tokens": torch.full((4,), 3)}
    for beta in (0.0, 0.1):  # with the KL term: the policy equals the reference, so its gradient is 0
        loss, _ = GRPO(0.2, beta)(m, batch)
        grads = torch.autograd.grad(loss, [p for p in m.parameters()], allow_unused=True)
        assert all(g is None or g.abs().max() < 1e-9 for g in grads)
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.0, 0.0])  # and not zero otherwise
    loss, _ = GRPO(0.2, 0.0)(m, batch)
    assert torch.autograd.grad(loss, m.output_weight)[0].abs().max() > 0


def test_arithmetic_splits_are_disjoint_and_answers_exact():
    task = Arithmetic(digits=2)
    held = task.held_out(200)
    train = {task.train_problem(seed, i).prompt for seed in (0, 1) for i in range(2000)}
    assert len({p.prompt for p in held}) == 200 and not train & {p.prompt for p in held}
    for p in held[:50]:
        a, op, b = p.prompt.removeprefix("What is ").split("?")[0].split()
        assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert task.train_problem(3, 17) == Arithmetic(2).train_problem(3, 17)  # a pure function of (seed, index)
    identity = Identity()
    assert not {p.prompt for p in identity.train} & {p.prompt for p in identity.val}
    assert build_task("arithmetic_tagged").rewards == ["tagged_answer_correct", "answer_tag"]
    with pytest.raises(ConfigError, match="grpo.eval_problems = 500: 1-digit arithmetic holds only"):
        Arithmetic(digits=1).held_out(500)
    assert len(Arithmetic(digits=1).held_out(30)) == 30
    with pytest.raises(ConfigError, match="grpo.task = 'poetry'"):
        build_task("poetry")


def test_reward_functions():
    assert arithmetic_correct("", "7 + 5 = 12", "12") == 1.0
    assert arithmetic_correct("", "It is -3.", "-3") == 1.0 and arithmetic_correct("", "13", "12") == 0.0
    assert tagged_answer_correct("", "so <answer> 12 </answer>", "12") == 1.0
    assert tagged_answer_correct("", "12", "12") == 0.0
    assert answer_tag("", "<answer>1</answer>", "") == 0.5 and answer_tag("", "<answer>1</answer><answer>", "") == 0


def test_same_language_by_hand():
    assert script_language("你叫什么名字？") == "zh" and script_language("What is your name?") == "en"
    assert script_language("我是SmolLM") == "zh"  # a Latin-script name inside Chinese: one word
    assert script_language("the word 你好 means hello") == "en"  # a Chinese quotation inside English
    assert script_language("你好 hello world") is None and script_language("12 + 7 = 19") is None
    zh, en = "你叫什么名字？", "What is your name?"
    assert same_language(zh, "我叫Shifty，很高兴认识你。", "zh") == 1.0
    assert same_language(zh, "My name is Shifty.", "zh") == 0.0
    assert same_language(en, "My name is Shifty.", "en") == 1.0
    assert same_language(en, "我叫Shifty。", "en") == 0.0
    assert same_language(en, "", "en") == 0.0 and same_language(en, "42", "en") == 0.0
    assert same_language("12 + 7?", "19", "") == 0.0  # a question without a language rewards nothing
    # a script, not a language: any Latin-script reply counts as English
    assert same_language(en, "Je m'appelle Shifty.", "en") == 1.0
    assert load_reward("same_language") is same_language


def test_language_task_splits_alternate_and_are_disjoint():
    task = build_task("language")
    assert isinstance(task, ReplyLanguage) and task.rewards == ["same_language"]
    assert min(len(task.val["zh"]), len(task.val["en"])) >= 20 and len(task.train["zh"]) > 300
    everything = len(task.val["zh"]) + len(task.val["en"])
    held = task.held_out(everything)
    trained = {p.prompt.lower() for pool in task.train.values() for p in pool}
    assert not trained & {p.prompt.lower() for p in held}  # the corpus's split key: the lower-cased question
    assert [p.answer for p in held[:6]] == ["zh", "en"] * 3
    assert [task.train_problem(0, i).answer for i in range(8)] == ["zh", "en"] * 4
    assert task.train_problem(5, 11) == ReplyLanguage().train_problem(5, 11)  # a pure function of (seed, index)
    for p in held:  # every problem's language is its question's, and a reply in it scores 1
        assert script_language(p.prompt) == p.answer
        assert same_language(p.prompt, "我不知道。" if p.answer == "zh" else "I do not know.", p.answer) == 1.0
    with pytest.raises(ConfigError, match=f"grpo.eval_problems = 999: the language task holds only {everything}"):
        task.held_out(999)


def test_user_rewards_load_and_bad_ones_are_named(tmp_path):
    (tmp_path / "mine.py").write_text("def length(prompt, completion, answer):\n    return len(completion)\n"
                                      "def broken(prompt, completion, answer):\n    raise ValueError('no')\n"
                                      "def text(prompt, completion, answer):\n    return 'high'\n")
    length = load_reward(f"{tmp_path}/mine.py:length")
    assert score(length, Problem("q", "a"), "four") == 4.0
    assert load_reward("chipshift.train.rewards:answer_tag") is answer_tag
    with pytest.raises(ChipshiftError, match=r"mine.py:broken raised ValueError: no on the completion 'x y'"):
        score(load_reward(f"{tmp_path}/mine.py:broken"), Problem("q", "a"), "x y")
    with pytest.raises(ChipshiftError, match=r"mine.py:text returned 'high', not a finite number, on the completion"):
        score(load_reward(f"{tmp_path}/mine.py:text"), Problem("q", "a"), "z")
    with pytest.raises(ConfigError, match="grpo.rewards: .*has no callable nothing"):
        load_reward(f"{tmp_path}/mine.py:nothing")
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_reward("nonsense")


@pytest.mark.parametrize("lora", [False, True])
def test_rollouts_match_the_trainer_log_probs_and_repeat(tok, model, lora):  # noqa: F811
    m = build_model(model.cfg, seed=3)
    if lora:
        apply_lora(m, LoRAConfig(enabled=True, rank=4), seed=0)
        with torch.no_grad():  # a non-zero adapter, so the engine must run it
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
    m.train()

    def rollouts(overlong_penalty=0.0):
        sampler = Sampler(m, tok, get_device("cpu"), max_len=96, slots=8)
        return Rollouts(sampler, Identity(), [load_reward("identity_fact")], group_size=4, batch_size=8,
                        max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, seed=5, beta=0.1,
                        reference=None if lora else copy.deepcopy(m), pad_id=tok.pad_id,
                        overlong_penalty=overlong_penalty)
    stream = rollouts()
    batch = stream.batch(0, 8)
    assert m.training  # the engine put it back
    assert (batch["completion_len"] > 0).all()
    loss, metrics = GRPO(0.2, 0.1)(m, batch)
    assert metrics["logp_diff_max"].item() <= 1e-4
    assert metrics["clip_frac"].item() == 0
    if lora:  # the reference is the base model: a non-zero KL against it
        assert metrics["kl"].item() > 0
    again = rollouts().batch(0, 8)  # seeded: the same completions from the same weights
    assert torch.equal(again["input_ids"], batch["input_ids"])
    # a completion cut off at max_new_tokens (12 tokens, no stop token) loses overlong_penalty
    labels = batch["labels"]
    last = labels.gather(1, (labels != -100).cumsum(1).argmax(1, keepdim=True))[:, 0]  # each one's last token
    cut = (batch["completion_len"] == 12) & ~torch.isin(last, torch.tensor(sorted(tok.stop_ids())))
    assert torch.equal(batch["truncated"].bool(), cut) and cut.any()
    penalised = rollouts(overlong_penalty=0.5).batch(0, 8)
    assert torch.equal(penalised["input_ids"], batch["input_ids"])
    assert torch.equal(penalised["rewards"], batch["rewards"] - 0.5 * cut)
    other = stream.batch(8, 8)  # the next step: other prompts or samples
    a, b = other["input_ids"], batch["input_ids"]
    assert a.shape != b.shape or not torch.equal(a, b)


def test_informative_first_keeps_groups_that_differ_in_drawn_order():
    rewards = torch.tensor([[1., 1., 1.], [0., 1., 0.], [0., 0., 0.], [1., 0., 1.], [2., 2., 2.], [0., 0., 1.]])
    assert informative_first(rewards, 2) == [1, 3]
    assert informative_first(rewards, 3) == [1, 3, 5]
    assert informative_first(rewards, 4) == [0, 1, 3, 5]  # too few differ: the first that agree fill
    assert informative_first(rewards, 6) == list(range(6))


def test_oversampled_rollouts_train_on_the_groups_with_signal(tok, model):  # noqa: F811
    m = build_model(model.cfg, seed=3).train()
    sampler = Sampler(m, tok, get_device("cpu"), max_len=96, slots=16)

    def stream(oversample, batch_size=8):
        return Rollouts(sampler, Identity(), [load_reward("identity_fact")], group_size=4, batch_size=batch_size,
                        max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, seed=5, pad_id=tok.pad_id,
                        overlong_penalty=0.5, oversample=oversample)
    plain, over = stream(1), stream(4)
    assert len(over.problems(1)) == 8 and over.problems(0)[:2] == plain.problems(0)
    kept = over.rollout(0)  # 8 groups sampled, 2 trained on
    everything = stream(1, batch_size=32).rollout(0)  # the same 8 groups (same problems and seeds), all kept
    rewards = everything["rewards"].view(8, 4)
    differ = rewards.max(1).values > rewards.min(1).values
    assert differ.sum() >= 2  # this seed: enough groups carry signal, so both kept ones do
    keep = informative_first(rewards, 2)
    assert kept["input_ids"].shape[0] == 8 and (kept["group_std"] > 0).all()
    assert torch.equal(kept["rewards"], rewards[keep].flatten())
    width = kept["input_ids"].shape[1]
    assert torch.equal(kept["input_ids"], everything["input_ids"].view(8, 4, -1)[keep].flatten(0, 1)[:, :width])
    assert kept["groups_with_signal"][0].item() == pytest.approx(differ.float().mean().item())
    _, metrics = GRPO(0.2)(m, kept)
    assert metrics["groups_with_signal"].item() == pytest.approx(differ.float().mean().item())
