"""Ablation distributions: where an intervened value ``z~`` comes from (paper Appendix A).

An ablation replaces a node's natural value ``z(u)`` with a value ``z~`` drawn from one of

- Zero ablation      z~ = 0                                   (Eq 35)
- Mean ablation      z~ = E_{u'}[Z(u')]                        (Eq 36)
- Noise ablation     z~ = z(u) + eps,  eps ~ N(0, std^2)       (Eq 37, see below)
- Resample ablation  z~ = Z(u'),  u' ~ P(u)                    (Eq 38)

Every ablation has the same small interface: ``n_draws`` (how many values it draws per context)
and ``sample(natural, generator) -> Tensor[n_draws, B, ...]``. An effect measured under a
stochastic ablation is the Monte-Carlo mean over the draws (Eq 39); see :mod:`causalnet.effects`.

Choices made where the paper leaves them open (``docs/conventions.md``):

- ``pool`` (Mean, Resample) is a tensor ``[P, ...]`` of values to draw from. By default it is the
  node's natural values in the *other* contexts of the batch, never the context's own value:
  Mean uses the leave-one-out mean, Resample draws its sources among the other contexts.
- Noise adds the noise to the node's value (``z(u) + eps``), not to the input as Eq 37 writes it.
- Resample draws ``k`` *distinct* sources per context (without replacement).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from causalnet.errors import InterventionError, ShapeError

__all__ = ["Ablation", "Zero", "Mean", "Resample", "Noise"]


class Ablation(ABC):
    """A distribution of intervention values for one node (paper Appendix A).

    Subclasses set ``n_draws`` and implement :meth:`sample`.
    """

    n_draws: int

    @abstractmethod
    def sample(self, natural: Tensor, generator: torch.Generator, *, node: str = "?") -> Tensor:
        """Draw ablation values ``[n_draws, B, ...]`` given the natural values ``[B, ...]``.

        ``node`` only names the node in error messages.
        """


def _check_pool(pool: Tensor, natural: Tensor, node: str, kind: str) -> Tensor:
    if pool.dim() != natural.dim() or pool.shape[1:] != natural.shape[1:]:
        raise ShapeError(
            f"{kind} pool for node {node!r} has shape {tuple(pool.shape)}; expected "
            f"[P, {', '.join(map(str, natural.shape[1:]))}] to match the node's values "
            f"{tuple(natural.shape)}"
        )
    if pool.shape[0] < 1:
        raise InterventionError(f"{kind} pool for node {node!r} is empty")
    return pool.to(dtype=natural.dtype, device=natural.device)


def _check_k(k: int, kind: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InterventionError(f"{kind}: k must be a positive int, got {k!r}")
    return k


class Zero(Ablation):
    """Zero ablation, Eq 35: ``z~ = 0``. One draw.

    >>> Zero().sample(torch.ones(2, 3), torch.Generator()).shape
    torch.Size([1, 2, 3])
    """

    n_draws = 1

    def sample(self, natural: Tensor, generator: torch.Generator, *, node: str = "?") -> Tensor:
        return torch.zeros_like(natural).unsqueeze(0)

    def __repr__(self) -> str:
        return "Zero()"


class Mean(Ablation):
    """Mean ablation, Eq 36: ``z~ = E[Z(u')]``, estimated on a pool. One draw.

    With ``pool=None`` the expectation is taken over the *other* contexts of the batch (the
    leave-one-out mean ``(sum_b' z(u_b') - z(u_b)) / (B - 1)``), so a context never contributes
    its own value; this needs a batch of at least 2. With a ``pool [P, ...]`` it is
    ``pool.mean(0)`` for every context.

    >>> Mean().sample(torch.tensor([1.0, 2.0, 6.0]), torch.Generator())
    tensor([[4.0000, 3.5000, 1.5000]])
    """

    n_draws = 1

    def __init__(self, pool: Tensor | None = None) -> None:
        self.pool = pool

    def sample(self, natural: Tensor, generator: torch.Generator, *, node: str = "?") -> Tensor:
        if self.pool is not None:
            pool = _check_pool(self.pool, natural, node, "Mean")
            return pool.mean(0).expand(natural.shape).unsqueeze(0).clone()
        n = natural.shape[0]
        if n < 2:
            raise InterventionError(
                f"Mean() on node {node!r} needs at least 2 contexts in the batch for a "
                f"leave-one-out mean, got {n}; pass pool= to use other values"
            )
        return ((natural.sum(0, keepdim=True) - natural) / (n - 1)).unsqueeze(0)

    def __repr__(self) -> str:
        return "Mean()" if self.pool is None else f"Mean(pool=[{self.pool.shape[0]} values])"


class Resample(Ablation):
    """Resample ablation, Eq 38: ``z~ = Z(u')`` for ``k`` source contexts ``u'`` per context.

    With ``pool=None`` the sources are the node's natural values in the *other* contexts of the
    batch (never the context itself); with a ``pool [P, ...]`` they are rows of the pool. Each
    context gets ``k`` distinct sources (drawn without replacement), so ``n_draws = k``.

    >>> Resample(k=2).sample(torch.tensor([0.0, 1.0, 2.0]), torch.Generator().manual_seed(0))
    tensor([[2., 0., 0.],
            [1., 2., 1.]])
    """

    def __init__(self, pool: Tensor | None = None, k: int = 1) -> None:
        self.pool = pool
        self.n_draws = _check_k(k, "Resample")

    @staticmethod
    def draw_sources(
        n_contexts: int,
        pool_size: int,
        k: int,
        generator: torch.Generator,
        own: Tensor | None = None,
    ) -> Tensor:
        """Draw ``k`` distinct pool indices per context: a LongTensor ``[k, n_contexts]``.

        Each column is a uniformly random ``k``-subset of ``range(pool_size)`` in random order,
        excluding ``own[b]`` (the pool index of context ``b`` itself) when ``own`` is given.
        Reusable on its own: the Hydra protocol draws the K source prompts of every prompt once
        and uses them for every site.

        >>> Resample.draw_sources(4, 4, 3, torch.Generator().manual_seed(0),
        ...                       own=torch.arange(4)).shape
        torch.Size([3, 4])
        """
        k = _check_k(k, "Resample.draw_sources")
        available = pool_size - (0 if own is None else 1)
        if k > available:
            where = "other contexts" if own is not None else "pool entries"
            raise InterventionError(
                f"Resample needs k={k} distinct sources per context but only {available} "
                f"{where} are available (pool size {pool_size})"
            )
        scores = torch.rand(n_contexts, pool_size, generator=generator, device=generator.device)
        if own is not None:
            own = torch.as_tensor(own, dtype=torch.long, device=scores.device)
            if own.shape != (n_contexts,):
                raise ShapeError(
                    f"Resample.draw_sources: own has shape {tuple(own.shape)}, "
                    f"expected ({n_contexts},)"
                )
            if n_contexts and (own.min() < 0 or own.max() >= pool_size):
                raise InterventionError(
                    f"Resample.draw_sources: own indices must lie in [0, {pool_size})"
                )
            scores[torch.arange(n_contexts, device=scores.device), own] = 2.0  # sorts last
        return scores.argsort(dim=1)[:, :k].T.contiguous()

    def sample(self, natural: Tensor, generator: torch.Generator, *, node: str = "?") -> Tensor:
        n = natural.shape[0]
        if self.pool is None:
            if n - 1 < self.n_draws:
                raise InterventionError(
                    f"Resample(k={self.n_draws}) on node {node!r} needs at least "
                    f"{self.n_draws + 1} contexts in the batch (k other contexts each), got {n}"
                )
            pool, own = natural, torch.arange(n)
        else:
            pool, own = _check_pool(self.pool, natural, node, "Resample"), None
            if pool.shape[0] < self.n_draws:
                raise InterventionError(
                    f"Resample(k={self.n_draws}) on node {node!r}: the pool has only "
                    f"{pool.shape[0]} values"
                )
        idx = self.draw_sources(n, pool.shape[0], self.n_draws, generator, own=own)
        return pool[idx.to(pool.device)]

    def __repr__(self) -> str:
        pool = "" if self.pool is None else f"pool=[{self.pool.shape[0]} values], "
        return f"Resample({pool}k={self.n_draws})"


class Noise(Ablation):
    """Noise ablation (Eq 37, applied to the value): ``z~ = z(u) + eps, eps ~ N(0, std^2)``.

    ``k`` independent draws per context, so ``n_draws = k``.

    >>> Noise(0.0, k=2).sample(torch.ones(3), torch.Generator())
    tensor([[1., 1., 1.],
            [1., 1., 1.]])
    """

    def __init__(self, std: float, k: int = 1) -> None:
        std = float(std)
        if not std >= 0.0 or std == float("inf"):
            raise InterventionError(f"Noise: std must be finite and >= 0, got {std!r}")
        self.std = std
        self.n_draws = _check_k(k, "Noise")

    def sample(self, natural: Tensor, generator: torch.Generator, *, node: str = "?") -> Tensor:
        if not natural.is_floating_point():
            raise InterventionError(
                f"Noise on node {node!r} needs floating-point values, got {natural.dtype}"
            )
        eps = torch.randn(
            (self.n_draws, *natural.shape),
            generator=generator,
            dtype=natural.dtype,
            device=generator.device,
        ).to(natural.device)
        return natural.unsqueeze(0) + self.std * eps

    def __repr__(self) -> str:
        return f"Noise(std={self.std}, k={self.n_draws})"
