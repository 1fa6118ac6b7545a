"""A bank sharded across the ranks of a torchrun job: only per-query statistics travel, never the bank.

Each rank holds the contiguous rows ``shard_rows(n_total, rank, world)`` of the bank and brings its own queries. With
``bank_contrastive_loss(..., shard=BankShard(...))`` the queries of all ranks are all-gathered (B_total x D, small);
each rank computes their statistics over its slice (:mod:`cir_plugins.negatives.core`) and the target terms of the
targets it owns; :class:`Exchange` combines them as the chunks of one bank are: one all-reduce of the max, one of
the rescaled sums with the owners' target terms (B x (3 + 2D) floats). The backward is local; the loss is the mean
over this rank's queries, equal (to rounding) to their loss against the full bank, so with equal batch sizes DDP's
gradient averaging gives the gradient of the global mean. Collectives use the shard's ``group`` (default: the
world) of an initialised process group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .._utils import shard_rows
from ..errors import CIRPluginsError, ConfigError, explain
from .core import BankStats

__all__ = ["BankShard", "Exchange", "shard_rows"]


def _require_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(explain("torch.distributed is not initialised",
                                  fix="call torch.distributed.init_process_group (torchrun sets the environment), "
                                  "or use bank_contrastive_loss / retrieval_metrics in a single process"))
    return dist.get_rank(group), dist.get_world_size(group)


def _gather_sizes(values, group, world, device):
    """(world, len(values)) list: every rank's int ``values``."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    return torch.stack(everyone).cpu().tolist()


def _check_layout(query, local, row_offset, n_total, group, checks):
    """Run this rank's input ``checks`` (returning its K of exclude_rows, or None), gather (row_offset, n_local,
    n_total, B, failed, K) of every rank and check that the shards tile [0, n_total); every rank reaches the
    exchange even when its inputs are refused, so a bad input on one rank is an error on all (not a hang).
    Returns (rank, world, batch sizes per rank, the largest K of any rank)."""
    rank, world = _require_group(group)
    error, k = None, 0
    try:
        k = checks() or 0
        if not isinstance(row_offset, int) or not isinstance(n_total, int):
            raise ConfigError(explain("row_offset and n_total must be ints", got=(row_offset, n_total),
                                      fix="pass the shard's first global row and the whole bank's size"))
    except CIRPluginsError as exc:
        error = exc
    device = local.device if isinstance(local, torch.Tensor) else torch.device("cpu")
    mine = [0, 0, 0, 0, 1, 0] if error else [row_offset, local.shape[0], n_total, query.shape[0], 0, k]
    table = _gather_sizes(mine, group, world, device)
    if error is not None:
        raise error
    refused = [r for r, row in enumerate(table) if row[4]]
    if refused:
        raise ConfigError(explain(f"rank(s) {refused} refused their inputs to this collective call",
                                  fix="see the error raised on those ranks"))
    if any(r[2] != n_total for r in table):
        raise ConfigError(explain("ranks disagree on n_total", got=[r[2] for r in table],
                                  fix="pass the full bank size"))
    fix, spans = "give rank r the rows shard_rows(n_total, r, world)", sorted((r[0], r[0] + r[1]) for r in table)
    if [start for start, _ in spans] != [0] + [stop for _, stop in spans[:-1]]:
        raise ConfigError(explain("the bank shards do not tile the rows [0, n_total) without gaps or overlaps",
                                  got=[(r[0], r[0] + r[1]) for r in table],
                                  expected="contiguous slices from shard_rows(n_total, rank, world)", fix=fix))
    if spans[-1][1] != n_total:
        raise ConfigError(explain("the bank shards do not cover n_total rows", got=spans[-1][1], expected=n_total,
                                  fix=fix))
    return rank, world, [r[3] for r in table], max(r[5] for r in table)


def _local_rows(rows: torch.Tensor, row_offset: int, n_local: int) -> torch.Tensor:
    """Global rows -> rows of this shard, -1 where the row lives elsewhere (or is padding)."""
    local = rows - row_offset
    return torch.where((rows >= 0) & (local >= 0) & (local < n_local), local, torch.full_like(rows, -1))


class Exchange:
    """What the loss needs to run over a sharded bank (made by :meth:`BankShard.join`): gather every
    rank's queries and rows, and combine the per-shard statistics across ranks (the same merge as for chunks)."""

    def __init__(self, group, rank, sizes, row_offset, n_local, k):
        self.group, self.rank, self.sizes, self.k = group, rank, sizes, k  # k: the largest K of any rank
        self.row_offset, self.n_local, self.bmax = row_offset, n_local, max(sizes)

    def _gather(self, x, fill):
        """(b, ...) -> (world * bmax, ...): every rank's rows, padded to bmax each."""
        pad = torch.full((self.bmax - x.shape[0], *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
        x = torch.cat([x, pad]).contiguous()
        parts = [torch.empty_like(x) for _ in self.sizes]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts)

    def gather(self, query, target_rows, exclude_rows):
        """All ranks' queries (world * bmax, D) with their target / excluded rows made local (-1 elsewhere)."""
        k = self.k  # ranks may pass different K; the layout exchange brought the largest
        excl = None
        if k:
            ex = exclude_rows if exclude_rows is not None else target_rows.new_empty(query.shape[0], 0)
            ex = torch.cat([ex, ex.new_full((ex.shape[0], k - ex.shape[1]), -1)], 1)
            excl = _local_rows(self._gather(ex, -1), self.row_offset, self.n_local)
        rows = _local_rows(self._gather(target_rows, -1), self.row_offset, self.n_local)
        return self._gather(query, 0), rows, excl

    def combine(self, stats: BankStats, s_y, g_y):
        """Global statistics of this rank's queries: all-reduce of the max, then of the rescaled sums and targets."""
        m = stats.m.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        r = stats.rescaled(m)
        dim = r.w.shape[1]
        packed = torch.cat([r.z[:, None], r.t[:, None], s_y[:, None], r.w, g_y], 1)  # (world * bmax, 3 + 2D)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        start = self.rank * self.bmax
        mine, m = packed[start:start + self.sizes[self.rank]], m[start:start + self.sizes[self.rank]]
        return BankStats(m, mine[:, 0], mine[:, 1], mine[:, 3:3 + dim]), mine[:, 2], mine[:, 3 + dim:]


@dataclass(frozen=True)
class BankShard:
    """This rank's slice of a bank of ``n_total`` rows: rows ``[row_offset, row_offset + n_local)``.

    Pass it as ``bank_contrastive_loss(query, local_bank, global_target_rows, tau, shard=...)``; the
    slices of all ranks of ``group`` must tile ``[0, n_total)`` (:meth:`of_rank` makes the usual one).
    """

    row_offset: int
    n_total: int
    group: Any = None

    @classmethod
    def of_rank(cls, n_total: int, group: Any = None) -> BankShard:
        """The shard ``shard_rows(n_total, rank, world)`` of this process in ``group``."""
        rank, world = _require_group(group)
        return cls(shard_rows(n_total, rank, world)[0], n_total, group)

    def join(self, query: torch.Tensor, local_bank: torch.Tensor, checks: Callable[[], int | None]) -> Exchange:
        """Run this rank's input ``checks`` and exchange the layout with every rank (a collective)."""
        rank, _, sizes, k = _check_layout(query, local_bank, self.row_offset, self.n_total, self.group, checks)
        return Exchange(self.group, rank, sizes, self.row_offset, local_bank.shape[0], k)
