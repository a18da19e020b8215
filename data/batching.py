"""Built samples -> tensors: the torch Datasets that ``data.dataset.build_dataset`` returns, and every
collate (B items -> one micro-batch, as the pipeline engine takes it).

Shapes (T = max_seq_len, every item padded on the right to T, all tensors int64):

kind="lm" (SFT / pretraining): ``LMDataset`` item = ``(inputs, labels)``, the DeepSpeed pipeline pair
    inputs = (input_ids [T], attention_mask [T])                 pack=False
    inputs = (input_ids [T], attention_mask [T], segment_ids [T]) pack=True
    labels [T]: HF convention, unshifted: labels[i] = input_ids[i] where trained, else -100 (the loss
    shifts). attention_mask is 1 on real tokens. segment_ids is 1..k for the k records of a packed row,
    0 on padding; attention_mask == (segment_ids > 0). Positions restart at 0 in every segment and
    attention must not cross segments (the model builds position ids and a block-diagonal causal mask
    from segment_ids). ``collate`` stacks B items into ``(inputs of [B, T], labels [B, T])``.
kind="pairwise" (reward model, DPO): ``PairwiseDataset`` item = ``((input_ids [2, T], attention_mask [2, T]),
    labels [2, T], margin float32 [])``, row 0 = prompt + chosen, row 1 = prompt + rejected, labels marking
    each answer + EOS, margin the record's ``margin`` (0 when absent). ``collate_pairs`` turns B items into
    ``[2B, T]`` tensors (+ margins [B]), the B chosen rows first, then the B rejected rows in the same
    order, so one micro-batch always holds both sides of its pairs. The
    reward is read at the last real token (the EOS): ``attention_mask.sum(-1) - 1``. ``collate_dpo``
    collates the same items carrying their reference log-probs (``trainer.rl.reference_logps.WithReference``).
kind="ranked" (reward model, K-wise): ``RankedDataset`` item = ``((input_ids [K, T], attention_mask [K, T]),
    labels [K, T], margin float32 [], n_responses int64 [])`` for pairwise and ranked records alike, row k =
    prompt + response k (best first; a pairwise record is chosen, rejected). K is the builder's
    ``max_responses`` (one K for the train and eval parts). A record with n < K responses
    fills rows n..K-1 with copies of its row 0 whose labels are all -100 (filler: no pair uses them).
    ``collate_ranked`` turns B items into ``[K*B, T]`` tensors (row k*B + b = response k of record b),
    margins [B] and n_responses [B]; with K = 2 (only pairs) the first three equal ``collate_pairs``' output.
kind="prompt" (PPO rollouts): ``PromptDataset`` item = ``(input_ids [T], attention_mask [T])`` LEFT-padded
    (generation appends on the right), the prompt ending with the generation prompt "Assistant:\\n".

Pads (the builder's pad id) are -100 in labels and 0 in attention_mask.
"""
import numpy as np
import torch
from torch.utils.data import Dataset

from data.packing import Samples

IGNORE_INDEX = -100


class LMDataset(Dataset):
    def __init__(self, samples: Samples, row_offsets: np.ndarray, row_samples: np.ndarray, max_len: int,
                 pad_id: int, packed: bool):
        self.samples, self.row_offsets, self.row_samples = samples, row_offsets, row_samples
        self.max_len, self.pad_id, self.packed = max_len, pad_id, packed

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def __getitem__(self, i: int):
        T = self.max_len
        ids = np.full(T, self.pad_id, dtype=np.int64)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
        seg = np.zeros(T, dtype=np.int64)
        pos = 0
        for k, s in enumerate(self.row_samples[self.row_offsets[i]:self.row_offsets[i + 1]], start=1):
            tok, tgt = self.samples.get(s)
            n = len(tok)
            ids[pos:pos + n] = tok
            labels[pos:pos + n] = np.where(tgt, tok, IGNORE_INDEX)
            seg[pos:pos + n] = k
            pos += n
        ids, labels, seg = torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(seg)
        mask = (seg > 0).long()
        return ((ids, mask, seg) if self.packed else (ids, mask)), labels


def collate(items: list) -> tuple:
    """[(inputs tuple of [T], labels [T])] -> (inputs tuple of [B,T], labels [B,T])."""
    inputs = tuple(torch.stack([it[0][k] for it in items]) for k in range(len(items[0][0])))
    return inputs, torch.stack([it[1] for it in items])


class PairwiseDataset(Dataset):
    """Samples 2k (chosen) and 2k+1 (rejected) form pair k."""

    def __init__(self, samples: Samples, max_len: int, pad_id: int, margins: np.ndarray):
        self.samples, self.max_len, self.pad_id = samples, max_len, pad_id
        self.margins = margins  # float32 [n pairs]

    def __len__(self) -> int:
        return len(self.samples) // 2

    def __getitem__(self, i: int):
        ids = np.full((2, self.max_len), self.pad_id, dtype=np.int64)
        labels = np.full((2, self.max_len), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((2, self.max_len), dtype=np.int64)
        for side in range(2):
            tok, tgt = self.samples.get(2 * i + side)
            ids[side, :len(tok)] = tok
            labels[side, :len(tok)] = np.where(tgt, tok, IGNORE_INDEX)
            mask[side, :len(tok)] = 1
        margin = torch.tensor(float(self.margins[i]), dtype=torch.float32)
        return (torch.from_numpy(ids), torch.from_numpy(mask)), torch.from_numpy(labels), margin


def collate_pairs(batch):
    """B pairwise items -> ((input_ids [2B, T], attention_mask [2B, T]), labels [2B, T], margins [B]);
    chosen rows first. (Items of K rows give [K*B, T], response-major: ``collate_ranked``.)"""
    ids = torch.stack([b[0][0] for b in batch])  # [B, 2, T]
    mask = torch.stack([b[0][1] for b in batch])
    labels = torch.stack([b[1] for b in batch])
    margins = torch.stack([b[2] for b in batch])
    flat = lambda x: x.transpose(0, 1).reshape(-1, x.shape[-1])  # [2, B, T] -> [2B, T]
    return (flat(ids), flat(mask)), flat(labels), margins


class RankedDataset(Dataset):
    """Record i's responses are samples record_start[i] .. record_start[i + 1] - 1, best first."""

    def __init__(self, samples: Samples, max_len: int, pad_id: int, margins: np.ndarray, n_responses: np.ndarray,
                 max_responses: int):
        self.samples, self.max_len, self.pad_id = samples, max_len, pad_id
        self.margins = margins  # float32 [n records]: a pairwise record's margin, 0 for ranked records
        self.n_responses = n_responses  # int64 [n records], each in 2..max_responses
        self.max_responses = max_responses  # K: rows per item
        self.record_start = np.concatenate([[0], np.cumsum(n_responses)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.n_responses)

    def __getitem__(self, i: int):
        K, T = self.max_responses, self.max_len
        ids = np.full((K, T), self.pad_id, dtype=np.int64)
        labels = np.full((K, T), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((K, T), dtype=np.int64)
        n = int(self.n_responses[i])
        for k in range(n):
            tok, tgt = self.samples.get(int(self.record_start[i]) + k)
            ids[k, :len(tok)] = tok
            labels[k, :len(tok)] = np.where(tgt, tok, IGNORE_INDEX)
            mask[k, :len(tok)] = 1
        ids[n:], mask[n:] = ids[0], mask[0]  # filler rows: real tokens (no all-padding row), labels all -100
        margin = torch.tensor(float(self.margins[i]), dtype=torch.float32)
        return (torch.from_numpy(ids), torch.from_numpy(mask)), torch.from_numpy(labels), margin, torch.tensor(n)


def collate_ranked(batch):
    """B ranked items -> ((input_ids [K*B, T], attention_mask [K*B, T]), labels [K*B, T], margins [B],
    n_responses [B]); row k*B + b is response k of item b (all best responses first)."""
    (ids, mask), labels, margins = collate_pairs([b[:3] for b in batch])  # the same response-major layout
    return (ids, mask), labels, margins, torch.stack([b[3] for b in batch])


def collate_dpo(items: list) -> tuple:
    """B WithReference items -> ((input_ids [2B,T], attention_mask [2B,T]), labels [2B,T], ref float64[2B]);
    chosen rows first. A record's `margin` (an RM field) is not used by DPO."""
    inputs, labels, _ = collate_pairs([it[:3] for it in items])
    return inputs, labels, torch.stack([it[3] for it in items]).t().reshape(-1)


class PromptDataset(Dataset):
    def __init__(self, samples: Samples, max_len: int, pad_id: int):
        self.samples, self.max_len, self.pad_id = samples, max_len, pad_id

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        tok, _ = self.samples.get(i)
        ids = np.full(self.max_len, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.max_len, dtype=np.int64)
        ids[self.max_len - len(tok):] = tok  # left padding
        mask[self.max_len - len(tok):] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)
