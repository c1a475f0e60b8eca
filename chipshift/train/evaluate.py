"""Evaluation after a post-training stage.

- Held-out loss: the objective on the held-out stream (the loop's `val_loss`).
- Identity accuracy (SFT): each held-out identity question (`identity_eval()`: phrasings
  never seen in training) is asked as one user turn through the checkpoint's chat
  template; the reply is generated greedily (at most `max_new_tokens`, stopping at an
  end-of-turn token) and is correct when it contains the key fact (case-insensitive exact
  substring: the name "Shifty" or the maker "chipshift").
- Preference accuracy (DPO): the share of held-out pairs the policy ranks the right way
  round, in two forms, each over the reply's tokens and its end-of-turn token:
  `preference_accuracy` compares the mean log-probability per reply token (length-
  normalised, as SimPO's reward and lm-eval's `acc_norm` are), `preference_accuracy_sum`
  the summed log-probability, logp(chosen | prompt) > logp(rejected | prompt). Both are
  strict and need no reference model, so the SFT and the DPO model are measured on one
  scale. The summed form ranks the shorter reply higher whatever it says: a truncated reply
  is a prefix of the chosen one, and a reply from another conversation is often a few words
  against a long real one (SmolLM2-135M-Instruct, a released instruct model, scores 46% on
  it over the built-in held-out pairs, 72% per token; docs/posttrain.md). (The loop's
  `val_reward_acc` is the reference-relative version: chosen_reward > rejected_reward.)
"""

from __future__ import annotations

import torch

from chipshift.data.posttrain_data import identity_correct, identity_eval
from chipshift.model.generate import encode_prompt, generate_naive
from chipshift.train.posttrain import IGNORE_INDEX, PairRows, sequence_logps


@torch.no_grad()
def answer(model, tok, question: str, max_new_tokens: int = 32) -> str:
    """The model's greedy reply to one user turn."""
    was_training = model.training
    model.eval()
    ids = encode_prompt(tok, question, chat=True)
    out = generate_naive(model, ids, max_new_tokens, stop_ids=tok.stop_ids())
    model.train(was_training)
    return tok.decode(out)


def identity_accuracy(model, tok, max_new_tokens: int = 32) -> tuple[float, list[dict]]:
    """(share correct, one row per held-out question with the reply)."""
    rows = []
    for question, fact in identity_eval():
        reply = answer(model, tok, question, max_new_tokens)
        rows.append({"question": question, "key_fact": fact, "reply": reply,
                     "correct": identity_correct(reply, fact)})
    return sum(r["correct"] for r in rows) / len(rows), rows


@torch.no_grad()
def preference_accuracy(model, stream: PairRows, batch_pairs: int = 8) -> dict[str, float]:
    """{"preference_accuracy": share of the stream's pairs with a higher mean log-probability
    per reply token for chosen, "preference_accuracy_sum": the same on summed log-probs}."""
    was_training = model.training
    model.eval()
    device = model.output_weight.device
    n = len(stream.pairs)
    per_token = summed = 0
    for s in range(0, n, batch_pairs):
        index = list(range(s, min(s + batch_pairs, n)))
        batch = {k: v.to(device) for k, v in stream.rows(index).items() if k != "ref_logps"}
        logps = sequence_logps(model, batch)  # chosen rows first, then rejected
        mean = logps / (batch["labels"] != IGNORE_INDEX).sum(1)
        k = len(index)
        summed += int((logps[:k] > logps[k:]).sum())
        per_token += int((mean[:k] > mean[k:]).sum())
    model.train(was_training)
    return {"preference_accuracy": per_token / n, "preference_accuracy_sum": summed / n}
