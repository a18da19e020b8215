"""Generation on the training pipeline: KV-cached decoding across the stages of a PipelineModule,
with several micro-batches in flight (ReaLHF's GenerateSchedule, on our engine's own layers).

    out = generate(engine.module, plan.model_config, prompts, max_new_tokens=64, stop_ids=[eos])

Every rank of a (P, D) topology calls it (collective within each pipeline replica, nothing across
replicas); `prompts` is the replica's own share of prompt token ids (`replica_share`), the same list
on every stage of the replica. The weights are the module's (an engine's trained ones, no copy).

Schedule. The replica's rows are sorted by length and split into M micro-batches (default M = P),
each left-padded. Each stage keeps one transformers `DynamicCache` per micro-batch for its blocks.
Step 0 prefills the prompts; each later step feeds only the newest token: stage 0 embeds it, every
stage runs its blocks on hidden [b,1,H] with the full mask [b, prompt+t] (positions, causal mask and
BLOOM's alibi come from it), and the last stage samples. Micro-batches go round robin, so while the
last stage works on micro-batch m, stage 0 already runs m+1: with M >= P every stage is busy in the
steady state.

Messages (torch.distributed point-to-point, global ranks of the replica, as in DeepSpeed's p2p):
    stage s -> s+1      hidden float[b, q, H]   (q = prompt length at prefill, 1 after; 1 once past
                                                 the last block: the final norm and head need only
                                                 the newest position)
    last -> every other stage   ids int64[b]    (stage 0 embeds them; the others need them only to
                                                 know, like stage 0, which rows have stopped)
Every stage therefore holds the same ids and stopping state, so all stages stop together without a
control message, and the ids and masks are returned on every rank. Each ordered pair of ranks carries
one kind of message, so messages match by order. Sends are `isend`s and every receive waits only on a
message its sender posts before needing anything back: no ordering can deadlock (each wait is on an
earlier (step, micro-batch) or an earlier stage of the same one).

Outputs (`Generation`): ids, attention mask, answer mask and per-row lengths on every rank of the
replica; the fp32 log-probs of the sampled tokens on the last stage only (where PPO computes its
losses): `logprobs` under the model's raw distribution (what a training forward gives: PPO's old
log-probs).
"""
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from transformers import DynamicCache

from compat.private_api import local_layers
from models.pipeline import num_blocks
from trainer.generation.stop_ids import answer_stop_ids, generation_pad_id
from trainer.generation.token_sampling import SamplingConfig, choose_next, row_seeds


class GenerationError(ValueError):
    """A request the generator cannot serve (prompt too long, bad settings, wrong topology)."""


@dataclass
class Generation:
    """One replica's results, rows in the order of its `prompts`.

    ids [n, S] int64: each prompt right-aligned (left padding) in columns [0, prompt_len), its answer
    from column prompt_len (stop token included), pad_id after it. attention_mask / answer_mask [n, S]
    int64: 1 on real prompt + answer tokens / on answer tokens only. logprobs
    [n, S - prompt_len] float32 (column j = answer token j), on the last stage only (None elsewhere).
    """
    ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor
    prompt_len: int
    n_new: torch.Tensor                 # int64 [n]: answer tokens per row
    finish_reason: list                 # per row: "stop" (a stop id was generated) | "length"
    seconds: list                       # per row: time from the start until its last token
    logprobs: Optional[torch.Tensor] = None

    def answer(self, row: int) -> list[int]:
        n = int(self.n_new[row])
        return self.ids[row, self.prompt_len:self.prompt_len + n].tolist()


def replica_rows(n_items: int, dp_rank: int, n_replicas: int, group: int = 1) -> list[int]:
    """Indices of a global list that replica dp_rank of n_replicas takes: the list cut into consecutive
    groups of `group` items (one prompt's samples), group g to replica g % D; group 1: items[r::D]."""
    n_groups = -(-n_items // group)
    return [i for g in range(dp_rank, n_groups, n_replicas) for i in range(g * group, min((g + 1) * group, n_items))]


def replica_share(items: Sequence, module, group: int = 1) -> list:
    """This replica's share of a global list (replica_rows): whole groups of `group` consecutive items,
    so that a prompt's samples are generated, scored and trained on one replica."""
    place = _place(module)
    return [items[i] for i in replica_rows(len(items), place.dp_rank, place.n_replicas, group)]


def generate(module, model_config, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             stop_ids: Optional[Sequence[int]] = None, pad_id: Optional[int] = None,
             sampling: SamplingConfig = SamplingConfig(), n_micro: Optional[int] = None,
             seeds: Optional[Sequence[int]] = None, max_context: Optional[int] = None, use_cache: bool = True,
             on_step: Optional[Callable] = None) -> Generation:
    """Generate up to `max_new_tokens` after each prompt. Collective over the ranks of each replica.

    module: a DeepSpeed PipelineModule (`engine.module`) or, in one process, `models.pipeline.SequentialPipe`.
    model_config: the prepared config its layers were built from (`ModelPlan.model_config`).
    stop_ids: a row stops after generating one of them (default: the config's eos_token_id).
    pad_id: fills ids after a row's end (default: the config's pad_token_id, else 0); masks say what is real.
    n_micro: micro-batches in flight (default P, at most the number of rows).
    seeds: one sampling seed per row (default `sampling.row_seeds(sampling.seed, prompts)`).
    max_context: prompt + max_new_tokens limit (default the config's max_position_embeddings, if any).
    use_cache: False recomputes the whole sequence at every step (a baseline for benchmarks).
    on_step(rows, ids, active): called on every rank after each step of a micro-batch with its row
        indices, the new ids int64[b] and which rows were still generating (bool[b]).
    """
    try:
        sampling.check()
    except ValueError as e:
        raise GenerationError(str(e)) from None
    if n_micro is not None and n_micro < 1:
        raise GenerationError(f"n_micro must be >= 1, got {n_micro}")
    place = _place(module)
    stop_ids = answer_stop_ids(None, model_config) if stop_ids is None else list(stop_ids)
    if not stop_ids:
        raise GenerationError("no stop_ids given and the model config has no eos_token_id")
    pad_id = generation_pad_id(model_config=model_config) if pad_id is None else pad_id
    _check_request(prompts, max_new_tokens, max_context or getattr(model_config, "max_position_embeddings", None))
    n = len(prompts)
    if seeds is not None and len(seeds) != n:
        raise GenerationError(f"{len(seeds)} seeds for {n} prompts")
    if n == 0:
        return _empty_result(place.is_last)
    seeds = list(seeds) if seeds is not None else row_seeds(sampling.seed, prompts)
    m = min(n_micro or place.n_stages, n)

    stage = _Stage(place, model_config, module)
    batches = [_MicroBatch(rows, prompts, pad_id, stage.device) for rows in _split_rows(prompts, m)]
    if place.is_last:
        for mb in batches:
            mb.prepare_sampling(sampling, [seeds[i] for i in mb.rows], model_config.vocab_size)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.int64, device=stage.device)

    was_training = getattr(module, "training", False)
    module.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            _run_schedule(stage, batches, max_new_tokens, stop, pad_id, sampling, use_cache, model_config, on_step, start)
    finally:
        stage.links.drain()
        module.train(was_training)
    return _assemble(batches, n, pad_id, place.is_last)


# ---------------------------------------------------------------------------------------------
# Where this rank sits, and its links to the other stages of its replica.

@dataclass(frozen=True)
class _Place:
    stage: int
    n_stages: int
    dp_rank: int
    n_replicas: int
    ranks: tuple  # global rank of each stage of this replica

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.n_stages - 1


def _place(module) -> _Place:
    if not hasattr(module, "topology"):  # one process: a SequentialPipe or any module of all the layers
        return _Place(0, 1, 0, 1, (0,))
    import torch.distributed as dist

    topo = module.topology()
    world = dist.get_world_size() if dist.is_initialized() else 1
    n_stages, n_replicas = topo.get_dim("pipe"), topo.get_dim("data")
    if n_stages * n_replicas != world:
        raise GenerationError(f"the pipeline topology has {n_stages} stages x {n_replicas} data-parallel replicas = "
                              f"{n_stages * n_replicas} ranks, but the world has {world}: launch P x D ranks")
    me = topo.get_coord(dist.get_rank())
    ranks = tuple(topo.get_rank(pipe=s, data=me.data) for s in range(n_stages))
    return _Place(me.pipe, n_stages, me.data, n_replicas, ranks)


class _Links:
    """isend/recv with this replica's other stages (global ranks, the default process group)."""

    def __init__(self, place: _Place, device):
        self.place, self.device = place, device
        self.pending = []  # (work, tensor): a sent tensor must stay alive until its send completes

    def send_hidden(self, hidden: torch.Tensor) -> None:
        self._isend(hidden.contiguous(), self.place.ranks[self.place.stage + 1])

    def recv_hidden(self, shape, dtype) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        torch.distributed.recv(buf, self.place.ranks[self.place.stage - 1])
        return buf

    def send_ids(self, ids: torch.Tensor) -> None:
        ids = ids.contiguous()
        for s in range(self.place.n_stages - 1):
            self._isend(ids, self.place.ranks[s])

    def recv_ids(self, batch: int) -> torch.Tensor:
        buf = torch.empty(batch, dtype=torch.int64, device=self.device)
        torch.distributed.recv(buf, self.place.ranks[-1])
        return buf

    def _isend(self, tensor: torch.Tensor, dst: int) -> None:
        self.pending.append((torch.distributed.isend(tensor, dst), tensor))
        # Bound the list: a send older than a few rounds has long been received (its receiver needs
        # nothing more from us to get there), so waiting on it cannot block.
        while len(self.pending) > 64:
            self.pending.pop(0)[0].wait()

    def drain(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


# ---------------------------------------------------------------------------------------------
# This stage's layers, and one micro-batch's state.

class _Stage:
    def __init__(self, place: _Place, model_config, module):
        self.place = place
        self.layers = local_layers(module) if hasattr(module, "topology") else list(enumerate(module.layers))
        self.n_blocks = num_blocks(model_config)
        params = [p for p in module.parameters() if p.is_floating_point()]
        self.device = params[0].device if params else torch.device("cpu")
        self.dtype = params[0].dtype if params else torch.float32
        self.hidden_size = model_config.hidden_size
        self.first_index = self.layers[0][0]
        self.has_blocks = any(1 <= i <= self.n_blocks for i, _ in self.layers)
        self.links = _Links(place, self.device)

    def seq_len_into(self, q: int) -> int:
        """Positions of the hidden state this stage receives: q, or 1 once past the last block."""
        return q if self.first_index <= self.n_blocks else 1

    def forward(self, x, mask: torch.Tensor, cache):
        """x: ids [b,q] (stage 0) or hidden [b,q',H]; mask [b, past+q] -> hidden, or logits [b,V] on the last stage."""
        h, shared = (x, mask), None
        for index, layer in self.layers:
            if index == self.n_blocks + 1:  # the final norm and head need only the newest position
                h = (h[0][:, -1:], h[1])
            if 1 <= index <= self.n_blocks:
                # Positions, mask (and RoPE / alibi) once per stage and step, not once per block.
                shared = shared or layer.attention_inputs(h, cache)
                h = layer(h, past_key_values=cache, attention_inputs=shared)
            else:
                h = layer(h)
        return h[:, -1] if self.place.is_last else h[0]


class _MicroBatch:
    def __init__(self, rows: list, prompts, pad_id: int, device):
        self.rows = rows
        length = max(len(prompts[i]) for i in rows)
        self.prompt = torch.full((len(rows), length), pad_id, dtype=torch.int64, device=device)
        self.prompt_mask = torch.zeros_like(self.prompt)
        for k, i in enumerate(rows):
            p = torch.as_tensor(list(prompts[i]), dtype=torch.int64, device=device)
            self.prompt[k, length - len(p):] = p
            self.prompt_mask[k, length - len(p):] = 1
        b = len(rows)
        self.tokens: list = []                     # int64[b] per step (pad after a row's end)
        self.done = torch.zeros(b, dtype=torch.bool, device=device)
        self.n_new = torch.zeros(b, dtype=torch.int64, device=device)
        self.finish_time = [0.0] * b
        self.finished = False
        self.cache = None
        self.pending = None                        # last stage: (ids sampled, their log-probs), not yet applied
        self.logprobs = []
        self.seen, self.generators = None, None

    @property
    def batch(self) -> int:
        return len(self.rows)

    def prepare_sampling(self, cfg: SamplingConfig, seeds: list, vocab: int) -> None:
        self.cfg = cfg
        if not cfg.greedy:
            self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        if cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros(self.batch, vocab, dtype=torch.bool, device=self.prompt.device)
            self.seen.scatter_(1, self.prompt, self.prompt_mask.bool())

    def input_ids(self, use_cache: bool) -> torch.Tensor:
        if not self.tokens:
            return self.prompt
        if use_cache:
            return self.tokens[-1][:, None]
        return torch.cat([self.prompt, torch.stack(self.tokens, 1)], 1)

    def mask(self) -> torch.Tensor:
        ones = torch.ones(self.batch, len(self.tokens), dtype=torch.int64, device=self.prompt.device)
        return torch.cat([self.prompt_mask, ones], 1)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Last stage: choose the next ids from logits [b,V]; keeps the log-probs until `advance`."""
        gens = self.generators
        if gens is not None and bool(self.done.any()):  # finished rows draw nothing (their streams stay put)
            gens = [g if not d else torch.Generator() for g, d in zip(gens, self.done.tolist())]
        ids, raw_logps, _ = choose_next(logits, self.seen, self.cfg, gens or [])
        self.pending = (ids, raw_logps)  # raw_logps: the raw distribution's log-probs of `ids` (PPO's old log-probs)
        return ids

    def advance(self, ids: torch.Tensor, stop: torch.Tensor, pad_id: int, now: float) -> torch.Tensor:
        """Apply step ids [b]: rows already done get pad; returns which rows were active."""
        active = ~self.done
        ids = torch.where(active, ids, torch.full_like(ids, pad_id))
        self.tokens.append(ids)
        self.n_new += active.long()
        stopped = active & torch.isin(ids, stop)
        self.done |= stopped
        if self.pending is not None:
            raw_logps = self.pending[1]
            self.logprobs.append(torch.where(active, raw_logps, torch.zeros_like(raw_logps)))
            self.pending = None
        if self.seen is not None:
            self.seen[active, ids[active]] = True
        for k in active.nonzero().flatten().tolist():
            self.finish_time[k] = now
        return active


def _run_schedule(stage: _Stage, batches: list, max_new_tokens: int, stop, pad_id: int, sampling,
                  use_cache: bool, model_config, on_step, start: float) -> None:
    place, links = stage.place, stage.links
    for t in range(max_new_tokens + 1):
        for mb in batches:
            if mb.finished:
                continue
            if t > 0:
                ids = mb.pending[0] if place.is_last else links.recv_ids(mb.batch)
                active = mb.advance(ids, stop, pad_id, time.perf_counter() - start)
                if on_step is not None:
                    on_step(mb.rows, mb.tokens[-1], active)
                if bool(mb.done.all()) or t == max_new_tokens:
                    mb.finished, mb.cache = True, None
                    continue
            if use_cache and mb.cache is None and stage.has_blocks:
                mb.cache = DynamicCache(config=model_config)
            mask = mb.mask()
            q = mask.shape[1] if (t == 0 or not use_cache) else 1  # positions this step feeds in
            if place.is_first:
                x = mb.input_ids(use_cache)
            else:
                x = links.recv_hidden((mb.batch, stage.seq_len_into(q), stage.hidden_size), stage.dtype)
            out = stage.forward(x, mask, mb.cache if use_cache else None)
            if place.is_last:
                ids = mb.sample(out)
                if place.n_stages > 1:
                    links.send_ids(ids)
            else:
                links.send_hidden(out)


# ---------------------------------------------------------------------------------------------
# Requests and results.

def _check_request(prompts, max_new_tokens: int, context: Optional[int]) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty: a prompt needs at least one token")
        if context is not None and len(p) + max_new_tokens > context:
            raise GenerationError(f"prompt {i} has {len(p)} tokens; with max_new_tokens {max_new_tokens} it needs "
                                  f"{len(p) + max_new_tokens} positions, more than the context of {context}: "
                                  "shorten the prompt or lower max_new_tokens")


def _split_rows(prompts, m: int) -> list:
    """Rows sorted by prompt length (less left padding), then m contiguous, near-equal micro-batches."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size, extra = divmod(len(order), m)
    out, pos = [], 0
    for k in range(m):
        n = size + (1 if k < extra else 0)
        out.append(order[pos:pos + n])
        pos += n
    return out


def _empty_result(is_last: bool) -> Generation:
    empty = torch.zeros(0, 0, dtype=torch.int64)
    lp = torch.zeros(0, 0, dtype=torch.float32) if is_last else None
    return Generation(empty, empty, empty, 0, torch.zeros(0, dtype=torch.int64), [], [], lp)


def _assemble(batches: list, n: int, pad_id: int, is_last: bool) -> Generation:
    prompt_len = max(mb.prompt.shape[1] for mb in batches)
    steps = max(len(mb.tokens) for mb in batches)
    width = prompt_len + steps
    ids = torch.full((n, width), pad_id, dtype=torch.int64)
    mask = torch.zeros(n, width, dtype=torch.int64)
    answer = torch.zeros(n, width, dtype=torch.int64)
    n_new = torch.zeros(n, dtype=torch.int64)
    lp = torch.zeros(n, steps, dtype=torch.float32) if is_last else None
    finish, seconds = [""] * n, [0.0] * n
    for mb in batches:
        L, T = mb.prompt.shape[1], len(mb.tokens)
        rows = torch.tensor(mb.rows)
        tokens = torch.stack(mb.tokens, 1).cpu()
        ids[rows, prompt_len - L:prompt_len] = mb.prompt.cpu()
        mask[rows, prompt_len - L:prompt_len] = mb.prompt_mask.cpu()
        ids[rows, prompt_len:prompt_len + T] = tokens
        real = torch.arange(T)[None, :] < mb.n_new.cpu()[:, None]
        mask[rows, prompt_len:prompt_len + T] = real.long()
        answer[rows, prompt_len:prompt_len + T] = real.long()
        n_new[rows] = mb.n_new.cpu()
        if is_last:
            lp[rows, :T] = torch.stack(mb.logprobs, 1).cpu()
        for k, i in enumerate(mb.rows):
            finish[i] = "stop" if bool(mb.done[k]) else "length"
            seconds[i] = mb.finish_time[k]
    return Generation(ids, mask, answer, prompt_len, n_new, finish, seconds, lp)
