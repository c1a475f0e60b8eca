"""GRPO on the one training loop: the objective, and a stream whose batches are rollouts.

Per prompt a group of G completions is sampled by `chipshift.infer.engine.Engine` from the
very module the trainer updates (no copy, no disk), each scored by the task's reward
functions (`chipshift.train.rewards`). With r the rewards of a group,

    advantage_i = (r_i - mean(r)) / (std(r) + 1e-4)          std unbiased (n - 1), as TRL

and, for every completion token t of completion i, with logp the trainer's log-probability,
old_logp the rollout engine's (the policy that sampled), ref_logp the reference's:

    ratio_t   = exp(logp_t - old_logp_t)
    surrogate = min(ratio_t * A_i, clip(ratio_t, 1 - eps, 1 + eps) * A_i)
    kl_t      = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1     (k3, as in the GRPO paper)
    loss      = sum_t (-surrogate + beta * kl_t) / number of completion tokens

The normalisation is token-level over the micro-batch (DAPO's, TRL's "dapo" loss type when a
step is one micro-batch): every completion token weighs the same, so long completions are
not discounted as under the paper's per-sequence mean. With data.micro_batch smaller than
data.batch_size, micro-batches weigh equally. One optimizer step per rollout batch, as TRL's
default: old_logp are the engine's log-probabilities of the sampled tokens (the model's own
distribution, temperature 1), so the ratio is 1 up to the trainer-to-rollout numerical
difference, which is logged (`logp_diff_max`), and the clip handles what half precision
adds. With a sampling temperature other than 1 the completions come from the tempered
distribution and the loss stays on the model's own: on-policy exactly at 1.0 only. A group
whose rewards are all equal has zero advantages: it moves the policy only through the KL
term, which has zero gradient where the policy equals the reference.

The reference (beta > 0): with LoRA the base model itself (adapters switched off, no memory
beyond the policy); full fine-tuning keeps a frozen copy of the init model. Its log-
probabilities are computed once per rollout, beside the completions. beta = 0 (the
default, as TRL's) needs no reference, and `kl` is then not logged.

Rollouts are seeded: completion g of prompt j at step s samples with the seed
hash(run.seed, s, j, g), and prompt j of step s is the task's training problem s * P * F + j
(F = `oversample`), so a resumed run draws exactly the completions an uninterrupted one would.

Dynamic sampling (DAPO's, `oversample` F > 1): each step samples F x P prompts' groups and
trains on P of them, those whose rewards differ first (in their drawn order), then, only if
too few differ, groups that agree. A group that agrees carries no advantage (with beta = 0 no
gradient at all), so once the policy answers most prompts alike, oversampling keeps every
step's batch full of signal for the price of F times the rollouts.

Logged per step (means over micro-batches): loss, reward (mean), reward_group_std (mean
within-group standard deviation), completion_len (tokens), truncated (share of completions cut
off at max_new_tokens; `overlong_penalty` is subtracted from their reward), groups_with_signal (share
of the sampled groups whose rewards differ, before selection), kl (beta > 0), clip_frac (share
of tokens where the clip is active), logp_diff_max (max |trainer - rollout| log-probability).
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

from chipshift.data.chat import IGNORE_INDEX
from chipshift.errors import ChipshiftError
from chipshift.infer.engine import Engine, Request
from chipshift.infer.sampling import SamplingParams
from chipshift.model.generate import encode_prompt
from chipshift.train.posttrain import target_logps
from chipshift.train.rewards import Problem, score

ADVANTAGE_EPS = 1e-4


# -- the loss -----------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(prompts, G) rewards -> (prompts, G) group-normalised advantages."""
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)
    return (rewards - mean) / (std + ADVANTAGE_EPS)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
              beta: float = 0.0, ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped objective over flat completion tokens (see the module docstring): logp,
    old_logp, ref_logp and advantages (per token: its completion's) all (tokens,)."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    per_token = -surrogate
    metrics = {}
    if beta:
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
        metrics["kl"] = kl.detach().mean()
    clipped = ((ratio < 1 - clip_eps) & (advantages < 0)) | ((ratio > 1 + clip_eps) & (advantages > 0))
    metrics["clip_frac"] = clipped.float().mean()
    return per_token.sum() / max(1, per_token.numel()), metrics


class GRPO:
    """The objective over rollout rows (see `Rollouts.rows`)."""

    name = "grpo"

    def __init__(self, clip_eps: float = 0.2, beta: float = 0.0) -> None:
        self.clip_eps, self.beta = clip_eps, beta

    def __call__(self, model, batch):
        logp, rows = target_logps(model, batch)
        valid = batch["labels"] != IGNORE_INDEX
        old = batch["rollout_logps"][valid]
        ref = batch["ref_logps"][valid] if self.beta else None
        loss, metrics = grpo_loss(logp, old, batch["advantages"][rows], self.clip_eps, self.beta, ref)
        metrics.update(reward=batch["rewards"].mean(), reward_group_std=batch["group_std"].mean(),
                       completion_len=batch["completion_len"].float().mean(), truncated=batch["truncated"].mean(),
                       logp_diff_max=(logp.detach() - old).abs().max())
        if "groups_with_signal" in batch:  # rollout rows carry it; hand-made ones need not
            metrics["groups_with_signal"] = batch["groups_with_signal"].mean()
        return loss, metrics

    def tokens(self, batch) -> int:
        return int(batch["num_tokens"].sum())


def groups_differ(rewards: torch.Tensor) -> torch.Tensor:
    """(groups,) bool: whose (groups, G) rewards are not all equal (the groups with an advantage)."""
    return rewards.max(1).values > rewards.min(1).values


def informative_first(rewards: torch.Tensor, count: int) -> list[int]:
    """Indices of `count` of the (groups, G) rewards' groups, in order: first those whose
    rewards differ (the only ones with an advantage), then as many of the others as fill."""
    spread = groups_differ(rewards).tolist()
    order = [i for i, s in enumerate(spread) if s] + [i for i, s in enumerate(spread) if not s]
    return sorted(order[:count])


# -- sampling from the trainer's module -----------------------------------------------------------
def sample_seed(*parts) -> int:
    """A 31-bit seed, a pure function of the parts (run seed, step, prompt, sample)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class Sampler:
    """The engine over the live model: built on first use in the model's dtype and device
    (after the trainer has placed it), shared by rollouts and evaluation. The engine runs
    the module itself; with LoRA on float32 weights, each adapted layer with its weight and
    update merged for the rollout (`LoRA.merged`: one GEMM instead of three), on half-precision
    weights the adapter layers as they are. The device's native kernel twin, which replaces
    the linear layers' forward, is used for full fine-tuning only."""

    def __init__(self, model, tok, device, max_len: int, slots: int) -> None:
        self.model, self.tok, self.device = model, tok, device
        self.max_len, self.slots = max_len, slots
        self._engine: Engine | None = None

    def reset(self) -> None:
        """Drop the engine (its cache is sized for the model's current dtype)."""
        self._engine = None

    @torch.no_grad()
    def run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Request]:
        was_training = self.model.training
        adapter = getattr(self.model, "adapter", None)
        if self._engine is None:
            self._engine = Engine(self.model, self.tok, max_batch=self.slots, max_len=self.max_len,
                                  kernels=adapter is None, target=self.device)
        self.model.eval()
        merged = adapter.merged() if adapter is not None and adapter.can_merge() else contextlib.nullcontext()
        try:
            with merged:
                requests = [self._engine.submit(Request(list(p), sp)) for p, sp in zip(prompts, params)]
                while not all(r.done.is_set() for r in requests):
                    self._engine.step()
        finally:
            self.model.train(was_training)
        for r in requests:
            if r.finish_reason == "error":
                raise ChipshiftError(f"rollout failed: {r.error}")
        return requests

    def prompt_ids(self, problem: Problem) -> list[int]:
        return encode_prompt(self.tok, problem.prompt, chat=True)


def total_reward(rewards, problem: Problem, completion: str) -> float:
    return sum(score(fn, problem, completion) for fn in rewards)


class Rollouts:
    """The GRPO stream: the rows of step s are generated when the loop first asks for them
    (its first micro-batch, before any backward of the step: the current weights sample)."""

    variable_shapes = True

    def __init__(self, sampler: Sampler, task, rewards: list, *, group_size: int, batch_size: int,
                 max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int,
                 beta: float = 0.0, reference=None, pad_id: int = 0, overlong_penalty: float = 0.0,
                 oversample: int = 1) -> None:
        self.sampler, self.task, self.rewards = sampler, task, rewards
        self.group_size, self.batch_size = group_size, batch_size
        self.prompts_per_step = batch_size // group_size
        self.oversample = oversample
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
        self.beta, self.reference, self.pad_id = beta, reference, pad_id
        self.overlong_penalty = overlong_penalty
        self.seq_len = sampler.max_len
        self._step, self._rows = -1, None

    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        step, offset = divmod(start, self.batch_size)
        if step != self._step:
            self._rows, self._step = self.rollout(step), step
        return {k: v[offset:offset + count] for k, v in self._rows.items()}

    def problems(self, step: int) -> list[Problem]:
        """The step's sampled problems: prompts_per_step x oversample of them."""
        n = self.prompts_per_step * self.oversample
        return [self.task.train_problem(self.seed, step * n + j) for j in range(n)]

    def rollout(self, step: int) -> dict[str, torch.Tensor]:
        problems, G = self.problems(step), self.group_size
        prompts = [self.sampler.prompt_ids(p) for p in problems]
        params = [SamplingParams(max_tokens=self.max_new_tokens, seed=sample_seed(self.seed, step, j, g),
                                 logprobs=0, **self.sampling) for j in range(len(problems)) for g in range(G)]
        requests = self.sampler.run([p for p in prompts for _ in range(G)], params)
        rewards = torch.tensor([total_reward(self.rewards, problems[i // G], r.text)
                                for i, r in enumerate(requests)]).view(-1, G)
        cut = torch.tensor([r.finish_reason == "length" for r in requests]).view(-1, G)
        rewards = rewards - self.overlong_penalty * cut
        keep = informative_first(rewards, self.prompts_per_step)
        signal = groups_differ(rewards).float().mean()
        rewards, cut = rewards[keep], cut[keep]
        kept = [g * G + i for g in keep for i in range(G)]
        rows = self.rows([prompts[k // G] for k in kept], [requests[k] for k in kept])
        rows.update(advantages=group_advantages(rewards).flatten(), rewards=rewards.flatten(),
                    truncated=cut.flatten().float(),
                    group_std=rewards.std(1).repeat_interleave(G),
                    groups_with_signal=signal.repeat(len(kept)))
        if self.beta:
            rows["ref_logps"] = self.reference_logps(rows)
        return rows

    def rows(self, prompts: list[list[int]], requests: list[Request]) -> dict[str, torch.Tensor]:
        """Prompt + completion per row, right-padded; labels on the completion's tokens (the
        stop token included), the engine's log-probabilities at the same places."""
        width = max(len(p) + len(r.output_ids) for p, r in zip(prompts, requests))
        n = len(requests)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        logps = torch.zeros(n, width)
        for k, (p, r) in enumerate(zip(prompts, requests)):
            out = r.output_ids
            ids[k, :len(p) + len(out)] = torch.tensor(p + out)
            labels[k, len(p) - 1:len(p) - 1 + len(out)] = torch.tensor(out)
            logps[k, len(p) - 1:len(p) - 1 + len(out)] = torch.tensor([e.logprob for e in r.logprobs])
        lengths = torch.tensor([len(r.output_ids) for r in requests])
        return {"input_ids": ids, "labels": labels, "rollout_logps": logps, "completion_len": lengths,
                "num_tokens": lengths}

    @torch.no_grad()
    def reference_logps(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """(rows, width) log-probabilities of the labels under the reference, 0 elsewhere."""
        model = self.sampler.model
        adapter = getattr(model, "adapter", None)
        reference = self.reference if adapter is None else model
        device = model.output_weight.device
        if adapter is None and (reference.output_weight.device, reference.dtype) != (device, model.dtype):
            reference.to(device, model.dtype)
        batch = {k: rows[k].to(device) for k in ("input_ids", "labels")}
        was_training = model.training
        model.eval()
        try:
            if adapter is not None:
                with adapter.disabled():
                    logp, _ = target_logps(reference, batch)
            else:
                logp, _ = target_logps(reference.eval(), batch)
        finally:
            model.train(was_training)
        out = torch.zeros(rows["labels"].shape)
        out[rows["labels"] != IGNORE_INDEX] = logp.float().cpu()
        return out


# -- evaluation ---------------------------------------------------------------------------------
def evaluate(sampler: Sampler, problems: list[Problem], rewards: list, *, samples: int, max_new_tokens: int,
             temperature: float, top_p: float, top_k: int, pass_reward: float = 1.0) -> dict:
    """Held-out pass@1 (greedy reply's reward >= pass_reward) and the mean reward over
    `samples` seeded samples per problem, with the greedy replies."""
    prompts = [sampler.prompt_ids(p) for p in problems]
    greedy = sampler.run(prompts, [SamplingParams(max_tokens=max_new_tokens) for _ in prompts])
    greedy_rewards = [total_reward(rewards, p, r.text) for p, r in zip(problems, greedy)]
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             seed=sample_seed("eval", i, k)) for i in range(len(problems)) for k in range(samples)]
    sampled = sampler.run([p for p in prompts for _ in range(samples)], params) if samples else []
    sampled_rewards = [total_reward(rewards, problems[i // samples], r.text) for i, r in enumerate(sampled)]
    return {"pass@1": sum(r >= pass_reward for r in greedy_rewards) / len(problems),
            "greedy_reward": sum(greedy_rewards) / len(problems),
            f"mean_reward@{samples}": sum(sampled_rewards) / max(1, len(sampled_rewards)),
            "problems": len(problems),
            "replies": [{"prompt": p.prompt, "answer": p.answer, "reply": r.text, "reward": w}
                        for p, r, w in zip(problems, greedy, greedy_rewards)]}
