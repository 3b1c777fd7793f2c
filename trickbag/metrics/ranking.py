"""Ranking metrics MRR, NDCG, MAP@k and recall@k on dense (Q, D) score/relevance matrices, fully vectorised.

Each row is one query and its D candidates; ``mask`` (Q, D) bool marks real candidates, so ragged lists fit
in one padded matrix (:func:`ranking_from_flat` builds it from flat ``query_id, score, relevance`` columns).
There is no Python loop over queries: score, tie-break and column are packed into one int64 key per item and
each row is sorted once (numpy's SIMD sort on CPU, torch.sort on GPU); MRR needs no sort at all.

Relevance:
  * NDCG uses graded relevance >= 0 with a named gain: ``"exponential"`` 2^rel - 1 (Burges et al. 2005, the
    usual default) or ``"linear"`` rel (what ``sklearn.metrics.ndcg_score`` uses: compare with
    ``gain="linear"``). Discount 1 / log2(position + 1); IDCG from the ideal order, both cut at k.
  * MRR, MAP@k and recall@k use binary relevance: relevant means rel > 0 (the score plays no part: an item
    with a negative score is still relevant if its relevance is positive; torchmetrics 1.9's RetrievalMRR/MAP/
    Precision/Recall zero the relevance of every item scored <= 0, so feed them sigmoid(scores)).

Ties in scores:
  * NDCG (``ties="average"``) gives every item in a tied block the block's mean gain, exactly as sklearn's
    ``ndcg_score`` (McSherry & Najork 2008).
  * MRR, MAP and recall use ``ties="pessimistic"`` by default: within a tied block, irrelevant items are ranked
    first. A model that outputs constant scores then earns the floor, not a lucky score; "optimistic" ranks
    relevant items first. (torchmetrics breaks ties by whatever order its sort returns.)

Queries with no relevant item (no positive gain for NDCG): ``empty="skip"`` leaves them out of the mean
(``reduction="none"`` gives nan for them), ``empty="zero"`` scores them 0 (sklearn's ndcg_score does this).
MAP@k divides by min(k, number of relevant items) (k=None: all relevant), so a perfect ranking scores 1;
torchmetrics' RetrievalMAP(top_k) divides by the relevant items found in the top k instead (higher values).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from trickbag.metrics._checks import UndefinedMetricWarning, _check_choice

__all__ = ["mrr", "ndcg", "map_at_k", "recall_at_k", "ranking_from_flat"]

GAINS = ("exponential", "linear")
_INDEX_BITS = 29  # low bits of a packed sort key that hold the column index
EMPTY = ("skip", "zero")
REDUCTIONS = ("mean", "none")


# ----------------------------------------------------------------------------------------------------------
# validation


def _check_inputs(
    scores, relevance, mask, k, empty, reduction
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    for name, value in (("scores", scores), ("relevance", relevance)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim != 2:
            raise ValueError(f"{name} must be (Q, D) (one row per query), got shape {tuple(value.shape)}")
    if scores.shape != relevance.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} != relevance shape {tuple(relevance.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be float, got {scores.dtype}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain nan: a nan score has no rank; mask the item out instead")
    if relevance.is_floating_point() and bool(torch.isnan(relevance).any()):
        raise ValueError("relevance contains nan: give every real item a relevance >= 0, mask the others")
    if relevance.is_complex() or (relevance.numel() and bool((relevance < 0).any())):
        raise ValueError("relevance must be real and >= 0 (graded relevance; 0 = irrelevant)")
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != scores.shape:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(scores.shape)}, got "
            f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
        )
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"k={k!r} must be None or an int >= 1")
    _check_choice("empty", empty, EMPTY)
    _check_choice("reduction", reduction, REDUCTIONS)
    if scores.shape[1] >= 2**_INDEX_BITS:
        raise ValueError(f"scores has {scores.shape[1]} candidates per query; at most {2**_INDEX_BITS - 1}")
    if mask is not None and bool(mask.all()):
        mask = None  # the common unpadded case skips every mask operation
    return scores, relevance, mask


def _relevant(relevance: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(Q, D) bool: a real item with relevance > 0."""
    relevant = relevance > 0
    return relevant if mask is None else relevant & mask


# ----------------------------------------------------------------------------------------------------------
# math


def _sort_values(rows: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending, values only."""
    if rows.device.type == "cpu":
        # numpy's SIMD sort is ~20x faster than torch.sort on CPU (measured in benchmarks/metrics.py)
        return torch.from_numpy(np.sort(rows.numpy(), axis=1))
    return rows.sort(dim=1).values


def _descending_code(scores: torch.Tensor) -> torch.Tensor:
    """(Q, D) int64 in [0, 2^32): smaller for higher scores, equal exactly when the scores are equal."""
    if scores.dtype in (torch.float16, torch.bfloat16, torch.float32):
        # an IEEE float's bits read as int32 order like the float once a negative's magnitude bits are
        # flipped; + 0.0 turns -0.0 into 0.0 so the two zeros tie, as they compare equal
        bits = (scores.float() + 0.0).view(torch.int32)
        signed_order = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return (2**31 - 1) - signed_order.long()
    # float64 does not fit in 32 bits: use the dense rank within the row instead (ties share a rank)
    return scores.shape[1] - 1 - torch.searchsorted(_sort_values(scores), scores.contiguous())


def _ranked_keys(scores: torch.Tensor, mask: torch.Tensor | None, tie_bit: torch.Tensor | None = None):
    """Per row, sorted int64 keys that give the ranking: real items first, score descending, then
    ``tie_bit`` ascending, then column. Bits: 62 = padding, 61..30 = score code, 29 = tie bit, 28..0 = column.

    One values-only sort of packed integers replaces a chain of stable argsorts and gathers.
    """
    key = _descending_code(scores)
    key <<= 30
    key |= torch.arange(scores.shape[1], device=scores.device)
    if tie_bit is not None:
        key |= tie_bit.long() << _INDEX_BITS
    if mask is not None:
        key |= (~mask).long() << 62
    return _sort_values(key)


def _ranked_relevant(scores, relevant, mask, ties: str) -> torch.Tensor:
    """(Q, D) bool: is the item at each rank relevant, under the given tie policy."""
    # pessimistic puts irrelevant items first within a tie (tie bit 0); optimistic puts relevant ones first
    tie_bit = relevant if ties == "pessimistic" else ~relevant
    bit = ((_ranked_keys(scores, mask, tie_bit) >> _INDEX_BITS) & 1).bool()
    if ties == "pessimistic":
        return bit
    return ~bit if mask is None else ~bit & _sorted_mask(mask)


def _sorted_mask(mask: torch.Tensor) -> torch.Tensor:
    """(Q, D) bool: real items first, as every ranking puts them."""
    counts = mask.sum(dim=1, keepdim=True)
    return torch.arange(mask.shape[1], device=mask.device) < counts


def _discount(length: int, k: int | None, device) -> torch.Tensor:
    """1 / log2(position + 1) for positions 1..length, zero beyond k."""
    positions = torch.arange(length, device=device, dtype=torch.float64)
    discount = 1.0 / torch.log2(positions + 2)
    if k is not None:
        discount[k:] = 0
    return discount


def _dcg_tie_averaged(scores, gains, mask, discount) -> torch.Tensor:
    """DCG where each block of tied scores shares its mean gain over the block's summed discounts (sklearn).

    Equivalently every item contributes gain x (block discount sum / block size). Rows without ties (most,
    for real-valued scores) take the plain sum; only rows with a tie pay for the block bookkeeping.
    """
    keys = _ranked_keys(scores, mask)
    sorted_gains = gains.gather(1, keys & (2**_INDEX_BITS - 1))
    dcg = (sorted_gains * discount).sum(dim=1)
    block_key = keys >> 30  # padding bit and score code: items tie when both agree
    tie_with_previous = block_key[:, 1:] == block_key[:, :-1]
    rows = torch.nonzero(tie_with_previous.any(dim=1)).flatten()
    if rows.numel():
        new_block = torch.ones(rows.numel(), keys.shape[1], dtype=torch.bool, device=keys.device)
        new_block[:, 1:] = ~tie_with_previous[rows]
        block = new_block.long().cumsum(dim=1) - 1
        zeros = torch.zeros(new_block.shape, dtype=torch.float64, device=keys.device)
        block_size = zeros.scatter_add(1, block, torch.ones_like(zeros))
        block_discount = zeros.scatter_add(1, block, discount.expand_as(zeros))
        weight = (block_discount / block_size.clamp_min(1)).gather(1, block)
        dcg[rows] = (sorted_gains[rows] * weight).sum(dim=1)
    return dcg


def _finish(per_query: torch.Tensor, defined: torch.Tensor, empty: str, reduction: str, name: str):
    """Apply the empty-query policy and reduce; nan + warning when no query is defined."""
    per_query = torch.where(
        defined, per_query, torch.full_like(per_query, 0.0 if empty == "zero" else float("nan"))
    )
    if reduction == "none":
        return per_query
    if empty == "skip":
        per_query = per_query[defined]
    if per_query.numel() == 0:
        warnings.warn(
            f"{name} is undefined: no query has a relevant item; returning nan",
            UndefinedMetricWarning,
            stacklevel=3,
        )
        return float("nan")
    return float(per_query.mean())


# ----------------------------------------------------------------------------------------------------------
# public functions


def ndcg(
    scores,
    relevance,
    *,
    k=None,
    gain="exponential",
    mask=None,
    empty="skip",
    ties="average",
    reduction="mean",
):
    """Normalised discounted cumulative gain at k.

    Args:
        scores: (Q, D) float, higher = ranked earlier. relevance: (Q, D) graded relevance >= 0.
        k: cut-off (None = all D). gain: "exponential" (2^rel - 1) or "linear" (rel; equals sklearn's
            ``ndcg_score(relevance, scores, k=k)`` with ``empty="zero"``).
        mask: (Q, D) bool, False = padding. empty: "skip" | "zero" for queries with no positive gain.
        ties: "average" only (sklearn's tie-averaged DCG). reduction: "mean" | "none" ((Q,) float64).
    """
    scores, relevance, mask = _check_inputs(scores, relevance, mask, k, empty, reduction)
    _check_choice("gain", gain, GAINS)
    _check_choice("ties", ties, ("average",))
    gains = relevance.double() if mask is None else torch.where(mask, relevance.double(), 0.0)
    if gain == "exponential":
        gains = torch.expm1(gains * math.log(2.0))
    discount = _discount(scores.shape[1], k, scores.device)
    dcg = _dcg_tie_averaged(scores, gains, mask, discount)
    ideal = (_sort_values(gains).flip(1) * discount).sum(dim=1)
    defined = ideal > 0
    return _finish(
        dcg / torch.where(defined, ideal, torch.ones_like(ideal)), defined, empty, reduction, "ndcg"
    )


def mrr(scores, relevance, *, mask=None, k=None, empty="skip", ties="pessimistic", reduction="mean"):
    """Mean reciprocal rank of the first relevant item (rel > 0); 0 for a query whose first hit is beyond k.

    Args as :func:`ndcg`; ties: "pessimistic" (irrelevant first within a tie) | "optimistic".
    """
    scores, relevance, mask = _check_inputs(scores, relevance, mask, k, empty, reduction)
    _check_choice("ties", ties, ("pessimistic", "optimistic"))
    relevant = _relevant(relevance, mask)
    # no sort needed: the first relevant item is the best-scored one, and its rank is 1 + the irrelevant
    # real items scored above it (pessimistic: or tied with it)
    has_relevant = relevant.any(dim=1)
    best = (
        torch.where(relevant, scores, -math.inf).amax(dim=1, keepdim=True)
        if scores.shape[1]
        else scores[:, :1]
    )
    ahead = (scores >= best) if ties == "pessimistic" else (scores > best)
    ahead &= ~relevant
    if mask is not None:
        ahead &= mask
    rank = ahead.sum(dim=1) + 1
    reciprocal = 1.0 / rank.double()
    if k is not None:
        reciprocal = torch.where(rank <= k, reciprocal, 0.0)
    return _finish(reciprocal, has_relevant, empty, reduction, "mrr")


def map_at_k(scores, relevance, *, k=None, mask=None, empty="skip", ties="pessimistic", reduction="mean"):
    """Mean average precision at k: sum of precision@i at each relevant rank i <= k, / min(k, #relevant).

    With k=None and no tied scores this is the mean of sklearn's ``average_precision_score`` per query.
    Args as :func:`mrr`.
    """
    scores, relevance, mask = _check_inputs(scores, relevance, mask, k, empty, reduction)
    _check_choice("ties", ties, ("pessimistic", "optimistic"))
    ranked = _ranked_relevant(scores, _relevant(relevance, mask), mask, ties)
    n_relevant = ranked.sum(dim=1).double()
    top = ranked[:, :k] if k is not None else ranked
    hits = top.double().cumsum(dim=1)
    positions = torch.arange(1, top.shape[1] + 1, device=top.device, dtype=torch.float64)
    denominator = n_relevant.clamp_max(k) if k is not None else n_relevant
    average_precision = (hits / positions * top).sum(dim=1) / denominator.clamp_min(1)
    return _finish(average_precision, n_relevant > 0, empty, reduction, "map")


def recall_at_k(scores, relevance, *, k, mask=None, empty="skip", ties="pessimistic", reduction="mean"):
    """Fraction of a query's relevant items (rel > 0) ranked in the top k. Args as :func:`mrr`; k required."""
    if k is None:
        raise ValueError("recall_at_k needs k (an int >= 1); with k=None every query has recall 1")
    scores, relevance, mask = _check_inputs(scores, relevance, mask, k, empty, reduction)
    _check_choice("ties", ties, ("pessimistic", "optimistic"))
    ranked = _ranked_relevant(scores, _relevant(relevance, mask), mask, ties)
    n_relevant = ranked.sum(dim=1).double()
    recall = ranked[:, :k].sum(dim=1).double() / n_relevant.clamp_min(1)
    return _finish(recall, n_relevant > 0, empty, reduction, "recall_at_k")


def ranking_from_flat(query_id: torch.Tensor, score: torch.Tensor, relevance: torch.Tensor):
    """Pack flat (N,) columns into padded (Q, D) matrices, one row per query id (sorted), D = largest list.

    Args:
        query_id: (N,) int query of each item. score: (N,) float. relevance: (N,) number >= 0.
    Returns:
        (scores (Q, D) float, relevance (Q, D) same dtype as given, mask (Q, D) bool, True = real item);
        items keep their input order within a row.
    """
    for name, value in (("query_id", query_id), ("score", score), ("relevance", relevance)):
        if not isinstance(value, torch.Tensor) or value.ndim != 1:
            raise ValueError(
                f"{name} must be a (N,) tensor, got {getattr(value, 'shape', type(value).__name__)}"
            )
    if not (query_id.shape == score.shape == relevance.shape):
        raise ValueError(
            f"query_id, score and relevance must have the same length, got "
            f"{query_id.shape[0]}, {score.shape[0]}, {relevance.shape[0]}"
        )
    if query_id.is_floating_point() or query_id.is_complex():
        raise TypeError(f"query_id must hold integer ids, got {query_id.dtype}")
    _, inverse, counts = torch.unique(query_id, return_inverse=True, return_counts=True)
    width = int(counts.max()) if counts.numel() else 0
    order = inverse.argsort(stable=True)
    row = inverse[order]
    starts = counts.cumsum(0) - counts
    column = torch.arange(order.numel(), device=order.device) - starts[row]
    shape = (counts.numel(), width)
    scores = torch.zeros(shape, dtype=score.dtype, device=score.device)
    relevances = torch.zeros(shape, dtype=relevance.dtype, device=relevance.device)
    mask = torch.zeros(shape, dtype=torch.bool, device=score.device)
    scores[row, column] = score[order]
    relevances[row, column] = relevance[order]
    mask[row, column] = True
    return scores, relevances, mask
