"""Post-training objectives and data streams for the one training loop: SFT and DPO.

SFT (`SFT`): conversations -> token ids with an assistant-only loss mask
(`chipshift.data.chat.encode_chat`), packed into rows of `data.seq_len` tokens with
per-example positions and segment ids (`chat.pack`), so packed examples neither attend to
nor take loss from each other. The loss is the mean cross-entropy over the target tokens
of the micro-batch; the output projection is computed for target tokens only.

DPO (`DPO`): pairs (prompt, chosen, rejected) -> two examples masked on the final reply
only. For a pair, with logp(y) = sum of the log-probabilities of the reply tokens (and its
end-of-turn token) given the prompt, and ref_logp the same under the reference model:

    chosen_reward   = beta * (logp(chosen)   - ref_logp(chosen))
    rejected_reward = beta * (logp(rejected) - ref_logp(rejected))
    loss            = -log sigmoid(chosen_reward - rejected_reward)      (mean over pairs)

Logged per step: loss, reward_acc (share of pairs with chosen_reward > rejected_reward,
strictly), reward_margin (mean chosen_reward - rejected_reward), chosen/rejected rewards
and chosen/rejected log-probabilities (means).

The reference log-probabilities are computed once, before training, by the `init`
model (which is the reference: the policy starts from it) in a first pass, and cached in
`RUN/ref_logps/<data hash>-<reference hash>.safetensors`. The key covers the exact token
ids and masks of every pair (so a change of data, tokenizer, template or seq_len makes a
new cache) and the reference weights' sha256 (so another reference does too); beta is not
part of the key: the cache holds log-probabilities, and beta only scales them in the
loss. A cache whose key matches is loaded instead of recomputed, so the reference model
never stays in memory beside the policy, and `--resume` does not recompute it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from chipshift.data.chat import IGNORE_INDEX, ChatExample, Packed, example_labels, pack
from chipshift.errors import ChipshiftError
from chipshift.train.objectives import LossWorkspace, chunked_cross_entropy


# -- streams ----------------------------------------------------------------------------------
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class _Indexed:
    """Global sample index -> item index, shuffled per epoch by (seed, epoch) unless not."""

    # batches differ in shape from step to step (pair widths, target counts): on a CPU the
    # trainer then keeps glibc from fragmenting the heap (devices.return_freed_host_memory)
    variable_shapes = True

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        if n < 1:
            raise ChipshiftError("no training examples left after packing (all cut or without a target)")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._cached = (-1, None)

    def item(self, index: int) -> int:
        epoch, i = divmod(index, self.n)
        if not self.shuffle:
            return i
        if self._cached[0] != epoch:
            self._cached = (epoch, _epoch_order(self.n, self.seed, epoch))
        return int(self._cached[1][i])


class PackedRows(_Indexed):
    """The SFT stream: packed rows, addressed by a global index (see `train.data`)."""

    def __init__(self, packed: Packed, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(packed.input_ids.shape[0], seed, shuffle)
        self.packed = packed
        self.seq_len = packed.input_ids.shape[1]

    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        rows = torch.tensor([self.item(start + k) for k in range(count)])
        p = self.packed
        return {"input_ids": p.input_ids[rows], "labels": p.labels[rows], "positions": p.positions[rows],
                "segment_ids": p.segment_ids[rows], "num_tokens": (p.example_ids[rows] >= 0).sum(1)}


def _cut(ex: ChatExample, seq_len: int) -> ChatExample:
    return ChatExample(ex.ids[:seq_len], ex.mask[:seq_len])


class PairRows(_Indexed):
    """The DPO stream: a batch of `count` pairs is 2 * count rows (chosen rows first), right-
    padded to the longest row in the batch, with `ref_logps` (2 * count,) when known.

    Rows are cut to `seq_len`. A pair is dropped (counted in `dropped`) when a side keeps no
    reply token, or when both sides are the same once cut: their difference lies beyond
    `seq_len`, so the pair teaches nothing and would score as a tie."""

    def __init__(self, pairs: list[tuple[ChatExample, ChatExample]], seq_len: int, pad_id: int,
                 ref_logps: torch.Tensor | None = None, seed: int = 0, shuffle: bool = True) -> None:
        kept = [(_cut(c, seq_len), _cut(r, seq_len)) for c, r in pairs]
        self.pairs = [(c, r) for c, r in kept if any(c.mask[1:]) and any(r.mask[1:]) and c != r]
        self.dropped = len(pairs) - len(self.pairs)
        super().__init__(len(self.pairs), seed, shuffle)
        self.seq_len, self.pad_id = seq_len, pad_id
        self.ref_logps = ref_logps  # (pairs, 2): chosen, rejected

    def rows(self, index: list[int]) -> dict[str, torch.Tensor]:
        exs = [self.pairs[i][0] for i in index] + [self.pairs[i][1] for i in index]
        width = max(len(e) for e in exs)
        ids = torch.full((len(exs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(exs), width), IGNORE_INDEX, dtype=torch.long)
        for k, e in enumerate(exs):
            ids[k, :len(e)] = torch.tensor(e.ids)
            labels[k, :len(e)] = torch.tensor(example_labels(e))
        out = {"input_ids": ids, "labels": labels, "num_tokens": torch.tensor([len(e) for e in exs])}
        if self.ref_logps is not None:
            ref = self.ref_logps[torch.tensor(index)]
            out["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return out

    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        return self.rows([self.item(start + k) for k in range(count)])

    def digest(self) -> str:
        """sha256 of every pair's ids and masks, in order (the data half of the cache key)."""
        h = hashlib.sha256()
        for c, r in self.pairs:
            for e in (c, r):
                h.update(np.asarray(e.ids, dtype=np.int64).tobytes())
                h.update(np.asarray(e.mask, dtype=np.int8).tobytes())
                h.update(b"|")
        return h.hexdigest()


# -- log-probabilities ------------------------------------------------------------------------
def _forward(model, batch):
    return model.forward_hidden(batch["input_ids"], positions=batch.get("positions"),
                                segment_ids=batch.get("segment_ids"))


def _compute_dtype(model, hidden):
    t = hidden.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else model.output_weight.dtype


def target_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each target token, flat index of its row) over labels != -100;
    the output projection runs on target tokens only, reduced in float32."""
    hidden = _forward(model, batch)
    labels = batch["labels"]
    valid = labels != IGNORE_INDEX
    h = hidden[valid]
    w = model.output_weight
    dtype = _compute_dtype(model, hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = (h.to(dtype) @ w.to(dtype).T).float()
        logp = logits.gather(1, labels[valid][:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[valid]
    return logp, rows


def sequence_logps(model, batch) -> torch.Tensor:
    """Summed target log-probability per row (rows,), float32."""
    logp, rows = target_logps(model, batch)
    return torch.zeros(batch["labels"].shape[0], device=logp.device, dtype=logp.dtype).index_add(0, rows, logp)


# -- objectives -------------------------------------------------------------------------------
class SFT:
    """Mean next-token cross-entropy over assistant tokens (labels != -100) of packed rows."""

    name = "sft"

    def __init__(self, chunk_rows: int | None = None) -> None:
        self.chunk_rows = chunk_rows
        self.workspace = LossWorkspace()

    def __call__(self, model, batch):
        hidden = _forward(model, batch)
        valid = batch["labels"] != IGNORE_INDEX
        loss = chunked_cross_entropy(hidden[valid], model.output_weight, batch["labels"][valid],
                                     self.chunk_rows, _compute_dtype(model, hidden), self.workspace,
                                     model.head_gemms)
        return loss, {}

    def tokens(self, batch) -> int:
        return int(batch["num_tokens"].sum())


def dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta: float):
    """Sigmoid DPO (see the module docstring): (loss, metrics), means over pairs."""
    chosen_reward = beta * (chosen_logps - ref_chosen)
    rejected_reward = beta * (rejected_logps - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    metrics = {"reward_acc": (margin > 0).float().mean(), "reward_margin": margin.mean(),
               "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean(),
               "chosen_logp": chosen_logps.mean(), "rejected_logp": rejected_logps.mean()}
    return loss, {k: v.detach() for k, v in metrics.items()}


class DPO:
    """Sigmoid DPO against cached reference log-probabilities (batch["ref_logps"])."""

    name = "dpo"

    def __init__(self, beta: float = 0.1) -> None:
        if beta <= 0:
            raise ChipshiftError(f"dpo.beta = {beta}: must be > 0")
        self.beta = beta

    def __call__(self, model, batch):
        logps = sequence_logps(model, batch)
        ref = batch["ref_logps"].to(logps.dtype)
        n = logps.shape[0] // 2
        return dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta)

    def tokens(self, batch) -> int:
        return int(batch["num_tokens"].sum())


# -- the reference cache ----------------------------------------------------------------------
@torch.no_grad()
def compute_reference(model, stream: PairRows, batch_pairs: int, device, progress: bool = True) -> torch.Tensor:
    """(pairs, 2) float32 summed log-probabilities of chosen and rejected under `model`."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(stream.pairs), 2)
    for s in tqdm(range(0, len(stream.pairs), batch_pairs), desc="reference log-probs", unit="batch",
                  disable=not progress, dynamic_ncols=True):
        index = list(range(s, min(s + batch_pairs, len(stream.pairs))))
        batch = {k: v.to(device) for k, v in stream.rows(index).items()}
        logps = sequence_logps(model, batch).float().cpu()
        out[s:s + len(index), 0], out[s:s + len(index), 1] = logps[:len(index)], logps[len(index):]
    model.train(was_training)
    return out


def reference_cache_path(run_dir: str | Path, data_hash: str, ref_hash: str) -> Path:
    return Path(run_dir) / "ref_logps" / f"{data_hash[:16]}-{ref_hash[:16]}.safetensors"


def cached_reference(run_dir, stream: PairRows, ref_hash: str, compute) -> tuple[torch.Tensor, Path, bool]:
    """(log-probs, cache path, whether they were computed now): loaded when a cache with the
    same key exists, else `compute()` and written atomically."""
    data_hash = stream.digest()
    path = reference_cache_path(run_dir, data_hash, ref_hash)
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            if meta.get("data_sha256") == data_hash and meta.get("reference_sha256") == ref_hash:
                return f.get_tensor("logps"), path, False
    logps = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({"logps": logps.contiguous()}, str(tmp),
              metadata={"data_sha256": data_hash, "reference_sha256": ref_hash,
                        "pairs": str(len(stream.pairs)), "columns": json.dumps(["chosen", "rejected"])})
    os.replace(tmp, path)
    return logps, path, True


def pack_conversations(tok, conversations: list[list[dict]], seq_len: int) -> Packed:
    """Encode (assistant-only masks) and pack; the pad id is the tokenizer's (else eos)."""
    from chipshift.data.chat import encode_chat

    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    return pack([encode_chat(tok, c) for c in conversations], seq_len, pad if pad is not None else 0)
