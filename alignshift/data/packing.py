"""Packed and shared-prompt layouts of preference batches (host side, pure numpy).

A padded batch (:func:`alignshift.data.encode.encode_pairs` / ``encode_lists``: one sequence per
``[T]`` row, right-padded) wastes the padding of every row. :func:`pack_batch` lays the same
batch out as fewer fixed-length rows:

* **packed** (``train.packing``): the sequences are placed whole, first-fit decreasing, into
  rows of ``row_len`` tokens; each row carries ``segment_ids`` (0 = padding, 1, 2, … = the
  sequences in the row) and ``positions`` that restart at 0 in every segment. The model
  confines attention to a segment (:class:`alignshift.models.layers.TokenLayout`).
* **shared prompt** (``train.share_prompt``): an example's sequences (chosen, rejected and,
  for KTO, the ``kl`` completion; or the K candidates of a listwise batch) share their prompt,
  laid out ONCE as ``[prompt | response 1 | response 2 | …]`` in one segment with
  ``branch_ids`` (0 = the prompt, j = response j): a response token sees the prompt and its
  own response, never another response, and its positions continue from the prompt's end as if
  the other responses were absent. Combined with packing, several such groups share a row;
  without packing, each group has a row of its own.

Batch layout
------------
Rows (leading axis ``R``), int32 ``[R, row_len]``: ``packed_input_ids`` (padding id 0),
``packed_segment_ids``, ``packed_positions`` and, shared-prompt only, ``packed_branch_ids``.

Targets (leading axis ``B``, the examples): for every sequence group ``g`` of the batch
(``chosen``, ``rejected``, ``kl``; ``cand`` for a listwise batch, with a K axis),
``{g}_target_index``, ``{g}_target_ids``, ``{g}_target_mask`` int32 ``[B, target_len]`` (``cand``:
``[B, K, target_len]``): the sequence's response tokens (the padded layout's ``loss_mask[1:]``
positions), each as the flat index ``row * row_len + column`` of the token that PREDICTS it
(whose logits are needed: the LM head runs on these positions only), the token id, and 1 (0 =
unused slot). The sum of their log-probs is the sequence's log-prob, exactly as the padded
layout's ``sequence_logps(logits[:, :-1], ids[:, 1:], loss_mask[:, 1:])``.

Every other array of the batch (reference log-probs, weights, ``cand_scores``, …) passes through
unchanged; the groups' ``{g}_input_ids``, ``{g}_attention_mask``, ``{g}_loss_mask`` are consumed.

Micro-batches
-------------
Gradient accumulation (:mod:`alignshift.train.accumulate`) splits every array of a batch into
``k`` micro-batches by taking leading-axis rows ``m, m + k, m + 2k, …``. With
``micro_batches=k`` the layout is built so that this split of every array is a self-contained
packed batch: example ``i`` belongs to micro-batch ``i % k``, row ``r`` to micro-batch ``r % k``,
and a target's index points into its micro-batch's rows (local row ``r // k``). ``B`` and ``R``
are multiples of ``k``.

Fixed shapes
------------
``R = k · c`` where ``c`` (rows per micro-batch) is ``rows`` when given (a batch that needs more
raises :class:`PackingError`), else the smallest value of :func:`row_counts` ``(u)`` that fits,
``u`` being the units per micro-batch (sequences ``(B / k) · G`` when packing, groups ``B / k``
with a shared prompt): at most :data:`ROW_LADDER` distinct shapes per run (multiples of
``ceil(u / ROW_LADDER)``, up to ``u``, one unit per row, which always fits). Without packing
``c = u``. Data is never dropped: a sequence (or shared-prompt group) longer than ``row_len``, or
with more response tokens than ``target_len``, raises :class:`PackingError`.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .loader import BatchIterator

__all__ = [
    "PACKED_ROW_KEYS",
    "ROW_LADDER",
    "TARGET_FIELDS",
    "PackedBatchIterator",
    "PackingError",
    "batch_groups",
    "pack_batch",
    "packed_row_len",
    "packing_fill",
    "row_counts",
]

#: Row arrays of a packed batch (``packed_branch_ids`` too with a shared prompt).
PACKED_ROW_KEYS = ("packed_input_ids", "packed_segment_ids", "packed_positions")
#: Per-group target arrays: ``{group}_{field}``.
TARGET_FIELDS = ("target_index", "target_ids", "target_mask")
#: Most distinct row counts per micro-batch (compiled shapes) of the automatic rule.
ROW_LADDER = 8
_PAIR_GROUPS = ("chosen", "rejected", "kl")
_TOKEN_FIELDS = ("input_ids", "attention_mask", "loss_mask")


class PackingError(ValueError):
    """A batch that cannot be laid out as asked (never silently truncated)."""


def batch_groups(batch: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """The sequence groups of a padded batch: ``("cand",)`` for a listwise ``cand_*`` batch, else
    those of ``chosen``, ``rejected``, ``kl`` whose ``{g}_input_ids`` it holds."""
    if "cand_input_ids" in batch:
        return ("cand",)
    groups = tuple(g for g in _PAIR_GROUPS if f"{g}_input_ids" in batch)
    if not groups:
        raise PackingError("batch has no sequence groups to pack (no chosen_/rejected_/kl_/cand_input_ids)")
    return groups


def packed_row_len(max_prompt_len: int, max_completion_len: int, *, n_responses: int = 2,
                   share_prompt: bool = False) -> int:
    """The row length of a packed run: one padded sequence (``max_prompt_len + max_completion_len``),
    or with a shared prompt one whole group (``max_prompt_len + n_responses · max_completion_len``),
    so that any encoded sequence (group) fits a row."""
    if share_prompt:
        return int(max_prompt_len) + int(n_responses) * int(max_completion_len)
    return int(max_prompt_len) + int(max_completion_len)


def row_counts(n_units: int, ladder: int = ROW_LADDER) -> tuple[int, ...]:
    """The allowed rows per micro-batch for ``n_units`` units (sequences or groups): the multiples
    of ``ceil(n_units / ladder)`` up to ``n_units`` (one unit per row always fits)."""
    if n_units < 1:
        raise ValueError(f"n_units must be >= 1; got {n_units}")
    g = math.ceil(n_units / ladder)
    return tuple(sorted({min(n_units, c * g) for c in range(1, ladder + 1)}))


def _sequences(batch, group: str):
    """``[(ids, loss)]`` real tokens of every sequence of ``group``, shape ``[B][G']``."""
    ids, att, loss = (np.asarray(batch[f"{group}_{f}"]) for f in _TOKEN_FIELDS)
    if ids.shape != att.shape or ids.shape != loss.shape:
        raise PackingError(f"{group}_input_ids/attention_mask/loss_mask shapes differ: "
                           f"{ids.shape}, {att.shape}, {loss.shape}")
    listwise = ids.ndim == 3
    if not listwise:
        ids, att, loss = ids[:, None], att[:, None], loss[:, None]
    B, K, T = ids.shape
    out = []
    for i in range(B):
        row = []
        for j in range(K):
            real = att[i, j].astype(bool)
            idx = np.flatnonzero(real)
            name = f"{group}[{i}]" if not listwise else f"{group}[{i}, {j}]"
            if idx.size and idx[-1] - idx[0] + 1 != idx.size:
                raise PackingError(f"{name}: the real tokens (attention_mask == 1) are not contiguous; packing "
                                   "needs one run of tokens per sequence (the encoder's layout)")
            if np.any(loss[i, j].astype(bool) & ~real):
                raise PackingError(f"{name}: loss_mask is 1 on a padding token")
            row.append((ids[i, j, idx].astype(np.int32), loss[i, j, idx].astype(bool)))
        out.append(row)
    return out, listwise, T


def _shared_prefix(seqs) -> int:
    """Tokens an example's sequences share as their prompt: the longest common prefix, cut at the
    first response (loss) token of any of them."""
    p = min(len(ids) for ids, _ in seqs)
    first_loss = [int(np.argmax(loss)) if loss.any() else len(loss) for _, loss in seqs]
    p = min(p, *first_loss)
    ref = seqs[0][0]
    for ids, _ in seqs[1:]:
        neq = np.flatnonzero(ids[:p] != ref[:p])
        if neq.size:
            p = int(neq[0])
    return p


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[tuple[int, int]]:
    """``(row, column)`` of every unit, first-fit decreasing (ties in input order)."""
    order = sorted(range(len(lengths)), key=lambda u: (-lengths[u], u))
    fill: list[int] = []
    place = [(0, 0)] * len(lengths)
    for u in order:
        for r, f in enumerate(fill):
            if f + lengths[u] <= capacity:
                place[u] = (r, f)
                fill[r] = f + lengths[u]
                break
        else:
            place[u] = (len(fill), 0)
            fill.append(lengths[u])
    return place


def pack_batch(batch: Mapping[str, np.ndarray], *, row_len: int, target_len: int | None = None,
               micro_batches: int = 1, rows: int = 0, share_prompt: bool = False,
               packing: bool = True) -> dict[str, np.ndarray]:
    """A padded preference batch (pairwise or listwise) in the packed / shared-prompt layout of
    the module docstring.

    Args:
      batch: ``{g}_{input_ids,attention_mask,loss_mask}`` ``[B, T]`` (listwise ``cand_*``
        ``[B, K, T]``) plus any per-example arrays (passed through).
      row_len: tokens per row (:func:`packed_row_len`).
      target_len: response-token slots per sequence (default ``T - 1``, always enough; the
        training path uses ``data.max_completion_len``, the encoder's bound).
      micro_batches: ``k``, the interleaved micro-batch split the layout must survive.
      rows: rows per micro-batch (0 = the automatic :func:`row_counts` rule).
      share_prompt: one ``[prompt | response 1 | …]`` group per example.
      packing: several units per row (False: one sequence, or one shared-prompt group, per row).
    Raises:
      PackingError: a unit longer than ``row_len``, a sequence with more than ``target_len``
        response tokens, a batch needing more than ``rows`` rows, ``B`` not divisible by ``k``,
        a sequence whose real tokens are not one contiguous run.

    The shared prompt of an example is the longest common prefix of its sequences' real tokens,
    cut at the first response (loss) token of any of them (0 tokens if they share none: then
    each response is a branch of its own, still correct).
    """
    k, row_len = int(micro_batches), int(row_len)
    if k < 1 or row_len < 1:
        raise PackingError(f"micro_batches and row_len must be >= 1; got {k}, {row_len}")
    groups = batch_groups(batch)
    per_group = {g: _sequences(batch, g) for g in groups}
    B = len(next(iter(per_group.values()))[0])
    T = next(iter(per_group.values()))[2]
    if B % k:
        raise PackingError(f"the batch has {B} examples, not divisible by micro_batches={k}")
    W = int(target_len) if target_len is not None else T - 1
    if W < 1:
        raise PackingError(f"target_len must be >= 1; got {W}")
    # slots: (group, j) per example, in a fixed order
    slots = [(g, j) for g in groups for j in range(len(per_group[g][0][0]))]
    seqs = [[per_group[g][0][i][j] for g, j in slots] for i in range(B)]
    for i in range(B):
        for (g, j), (ids, loss) in zip(slots, seqs[i]):
            n_t = int(loss[1:].sum())
            if n_t > W:
                name = g if not per_group[g][1] else f"{g}[:, {j}]"
                raise PackingError(f"example {i}: {name} has {n_t} response tokens, more than target_len={W} "
                                   "(data.max_completion_len)")

    # units: (example, [(slot or None for the prompt, token ids, positions, branch)])
    units: list[tuple[int, list]] = []
    for i in range(B):
        if share_prompt:
            p = _shared_prefix(seqs[i])
            parts = [(None, seqs[i][0][0][:p], np.arange(p), 0)]
            parts += [(s, ids[p:], np.arange(p, len(ids)), s + 1) for s, (ids, _) in enumerate(seqs[i])]
            units.append((i, parts))
        else:
            for s, (ids, _) in enumerate(seqs[i]):
                units.append((i, [(s, ids, np.arange(len(ids)), 0)]))
    lengths = [sum(len(part[1]) for part in parts) for _, parts in units]
    for (i, parts), n in zip(units, lengths):
        if n > row_len:
            what = "shared-prompt group" if share_prompt else f"sequence {[g for g, _ in slots][parts[0][0]]}"
            raise PackingError(f"example {i}: its {what} has {n} tokens, more than the row length {row_len}")

    # place each micro-batch's units
    placements, needed = {}, []
    for m in range(k):
        mine = [u for u, (i, _) in enumerate(units) if i % k == m]
        if packing:
            place = _first_fit_decreasing([lengths[u] for u in mine], row_len)
        else:
            place = [(r, 0) for r in range(len(mine))]
        placements.update(zip(mine, place))
        needed.append(1 + max(r for r, _ in place))
    n_units = len(units) // k
    if not packing:
        c = n_units
    elif rows:
        c = int(rows)
        if max(needed) > c:
            raise PackingError(f"the batch needs {max(needed)} packed rows of {row_len} tokens per micro-batch, "
                               f"more than the fixed rows={c}")
    else:
        c = next(n for n in row_counts(n_units) if n >= max(needed))
    R = k * c

    out_ids = np.zeros((R, row_len), np.int32)
    out_seg = np.zeros((R, row_len), np.int32)
    out_pos = np.zeros((R, row_len), np.int32)
    out_br = np.zeros((R, row_len), np.int32)
    n_seg = np.zeros(R, np.int32)
    tgt = {f: np.zeros((B, len(slots), W), np.int32) for f in TARGET_FIELDS}
    for u, (i, parts) in enumerate(units):
        local, col = placements[u]
        r = local * k + i % k
        n_seg[r] += 1
        starts = {}
        for s, ids, pos, br in parts:
            a = col
            out_ids[r, a:a + len(ids)] = ids
            out_seg[r, a:a + len(ids)] = n_seg[r]
            out_pos[r, a:a + len(ids)] = pos
            out_br[r, a:a + len(ids)] = br
            starts[s] = a
            col += len(ids)
        base = local * row_len
        for s in [part[0] for part in parts if part[0] is not None]:
            ids, loss = seqs[i][s]
            t = np.flatnonzero(loss[1:]) + 1  # response tokens, each predicted by token t - 1
            if share_prompt:
                p = len(parts[0][1])
                src = np.where(t - 1 < p, starts[None] + t - 1, starts[s] + (t - 1 - p))
            else:
                src = starts[s] + t - 1
            tgt["target_index"][i, s, :len(t)] = base + src
            tgt["target_ids"][i, s, :len(t)] = ids[t]
            tgt["target_mask"][i, s, :len(t)] = 1

    out = {k_: np.asarray(v) for k_, v in batch.items()
           if not any(k_ == f"{g}_{f}" for g in groups for f in _TOKEN_FIELDS)}
    out.update(packed_input_ids=out_ids, packed_segment_ids=out_seg, packed_positions=out_pos)
    if share_prompt:
        out["packed_branch_ids"] = out_br
    for g in groups:
        cols = [s for s, (g2, _) in enumerate(slots) if g2 == g]
        for f in TARGET_FIELDS:
            x = tgt[f][:, cols]
            out[f"{g}_{f}"] = x if g == "cand" else x[:, 0]
    return out


def packing_fill(packed: Mapping[str, np.ndarray]) -> float:
    """Fraction of a packed batch's row tokens that are real (not padding)."""
    seg = np.asarray(packed["packed_segment_ids"])
    return float((seg != 0).mean())


class PackedBatchIterator(BatchIterator):
    """:class:`~alignshift.data.BatchIterator` whose batches come out packed (:func:`pack_batch`
    with ``pack_kwargs``). The data order and the resume state are the plain iterator's."""

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int, shuffle: bool = True,
                 pack_kwargs: Mapping | None = None):
        super().__init__(arrays, batch_size, seed=seed, shuffle=shuffle)
        self.pack_kwargs = dict(pack_kwargs or {})

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        return pack_batch(super().batch_at(step), **self.pack_kwargs)
