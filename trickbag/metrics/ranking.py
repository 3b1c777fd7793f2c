"""Ranking metrics MRR, NDCG, MAP@k and recall@k on dense (Q, D) score/relevance matrices, fully vectorised.

Each row is one query and its D candidates; ``mask`` (Q, D) bool marks real candidates, so ragged lists fit
in one padded matrix (:func:`ranking_from_flat` builds it from flat ``query_id, score, relevance`` columns).
There is no Python loop over queries: one or a few batched sorts, then cumulative sums.

Relevance:
  * NDCG uses graded relevance >= 0 with a named gain: ``"exponential"`` 2^rel - 1 (Burges et al. 2005, the
    usual default) or ``"linear"`` rel (what ``sklearn.metrics.ndcg_score`` uses: compare with
    ``gain="linear"``). Discount 1 / log2(position + 1); IDCG from the ideal order, both cut at k.
  * MRR, MAP@k and recall@k use binary relevance: relevant means rel > 0 (the score plays no part: an item
    with a negative score is still relevant if its relevance is positive).

Ties in scores:
  * NDCG ``ties="average"`` (default) gives every item in a tied block the block's mean gain, exactly as
    sklearn's ``ndcg_score`` (Mc Sherry & Najork 2008); "pessimistic"/"optimistic" rank the tied block worst/
    best first.
  * MRR, MAP and recall use ``ties="pessimistic"`` by default: within a tied block, irrelevant items are ranked
    first. A model that outputs constant scores then earns the floor, not a lucky score; "optimistic" ranks
    relevant items first. (torchmetrics breaks ties by whatever order its sort returns.)

Queries with no relevant item (no positive gain for NDCG): ``empty="skip"`` leaves them out of the mean
(``reduction="none"`` gives nan for them), ``empty="zero"`` scores them 0 (sklearn's ndcg_score does this).
MAP@k divides by min(k, number of relevant items) (k=None: all relevant), so a perfect ranking scores 1.
"""

from __future__ import annotations

import warnings

import torch

from trickbag.metrics._checks import UndefinedMetricWarning, _check_choice

__all__ = ["mrr", "ndcg", "map_at_k", "recall_at_k", "ranking_from_flat"]

GAINS = ("exponential", "linear")
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
    relevance = torch.where(
        mask, relevance.double(), torch.zeros((), dtype=torch.float64, device=scores.device)
    )
    return scores.double(), relevance, mask


# ----------------------------------------------------------------------------------------------------------
# math


def _order(scores: torch.Tensor, mask: torch.Tensor, tie_key: torch.Tensor | None, tie_descending: bool):
    """Permutation (Q, D): real items by score descending, masked items last, ties ordered by ``tie_key``."""
    order = torch.arange(scores.shape[1], device=scores.device).expand(scores.shape)
    if tie_key is not None:  # lexicographic order by successive stable sorts, least important key first
        order = tie_key.argsort(dim=1, descending=tie_descending, stable=True)
    order = order.gather(1, scores.gather(1, order).argsort(dim=1, descending=True, stable=True))
    if not bool(mask.all()):
        order = order.gather(
            1, mask.gather(1, order).to(torch.int8).argsort(dim=1, descending=True, stable=True)
        )
    return order


def _ranked_relevant(scores, relevance, mask, ties: str) -> torch.Tensor:
    """(Q, D) bool: is the item at each rank relevant (rel > 0), under the given tie policy."""
    relevant = relevance > 0
    order = _order(scores, mask, relevant.to(torch.int8), tie_descending=ties == "optimistic")
    return relevant.gather(1, order)


def _discount(length: int, k: int | None, device) -> torch.Tensor:
    """1 / log2(position + 1) for positions 1..length, zero beyond k."""
    positions = torch.arange(length, device=device, dtype=torch.float64)
    discount = 1.0 / torch.log2(positions + 2)
    if k is not None:
        discount[k:] = 0
    return discount


def _dcg_tie_averaged(scores, gains, mask, discount) -> torch.Tensor:
    """DCG where each block of tied scores shares its mean gain over the block's summed discounts (sklearn)."""
    order = _order(scores, mask, None, False)
    sorted_scores, sorted_gains, sorted_mask = (
        scores.gather(1, order),
        gains.gather(1, order),
        mask.gather(1, order),
    )
    new_block = torch.ones_like(sorted_mask)
    new_block[:, 1:] = (sorted_scores[:, 1:] != sorted_scores[:, :-1]) | (
        sorted_mask[:, 1:] != sorted_mask[:, :-1]
    )
    block = new_block.long().cumsum(dim=1) - 1
    zeros = torch.zeros_like(sorted_gains)
    block_gain = zeros.scatter_add(1, block, sorted_gains)
    block_size = zeros.scatter_add(1, block, torch.ones_like(sorted_gains))
    block_discount = zeros.scatter_add(1, block, discount.expand_as(sorted_gains))
    return (block_gain / block_size.clamp_min(1) * block_discount).sum(dim=1)


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
        ties: "average" (sklearn) | "pessimistic" | "optimistic". reduction: "mean" | "none" ((Q,) float64).
    """
    scores, relevance, mask = _check_inputs(scores, relevance, mask, k, empty, reduction)
    _check_choice("gain", gain, GAINS)
    _check_choice("ties", ties, ("average", "pessimistic", "optimistic"))
    gains = (
        torch.expm1(relevance * torch.log(torch.tensor(2.0, dtype=torch.float64)))
        if gain == "exponential"
        else relevance
    )
    discount = _discount(scores.shape[1], k, scores.device)
    if ties == "average":
        dcg = _dcg_tie_averaged(scores, gains, mask, discount)
    else:
        order = _order(scores, mask, gains, tie_descending=ties == "optimistic")
        dcg = (gains.gather(1, order) * discount).sum(dim=1)
    ideal = (gains.sort(dim=1, descending=True).values * discount).sum(dim=1)
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
    ranked = _ranked_relevant(scores, relevance, mask, ties)
    first = (~ranked).long().cumprod(dim=1).sum(dim=1)  # leading irrelevant items; safe for D = 0
    hit = ranked.any(dim=1) & ((first < k) if k is not None else True)
    reciprocal = torch.where(hit, 1.0 / (first + 1).double(), torch.zeros((), dtype=torch.float64))
    return _finish(reciprocal, ranked.any(dim=1), empty, reduction, "mrr")


def map_at_k(scores, relevance, *, k=None, mask=None, empty="skip", ties="pessimistic", reduction="mean"):
    """Mean average precision at k: sum of precision@i at each relevant rank i <= k, / min(k, #relevant).

    With k=None and no tied scores this is the mean of sklearn's ``average_precision_score`` per query.
    Args as :func:`mrr`.
    """
    scores, relevance, mask = _check_inputs(scores, relevance, mask, k, empty, reduction)
    _check_choice("ties", ties, ("pessimistic", "optimistic"))
    ranked = _ranked_relevant(scores, relevance, mask, ties)
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
    ranked = _ranked_relevant(scores, relevance, mask, ties)
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
