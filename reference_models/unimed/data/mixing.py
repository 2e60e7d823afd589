"""Multi-task batch samplers: which entries go into each training batch.

Every sampler turns a ``list[Sample]`` into an endless, deterministic stream of batches (lists of indices into
that list). The stream depends only on the entries' sources, tasks and image ids, the batch size, the seed and
the sampler's options, never on the rank or on wall-clock state, so the training loop can stride it across DDP
ranks and resume exactly by re-creating the sampler and calling ``iter_from(batches_already_consumed)``;
skipping costs index generation only (no data is touched).

- `TaskRatioSampler`: Uni-Med's default. Each batch draws one source with probability proportional to its ratio
  and takes ``batch_size`` entries from that source's own shuffled cycle, so a batch holds one task.
- `MixedTaskSampler`: plain shuffled batches over all entries (tasks mixed within a batch).
- `ImageCentricSampler`: the DMAX-based strategy borrowing IMAX's image-centric idea: all entries of one image
  land in the same batch, or in consecutive batches when they cannot fit in one.

`build_sampler` picks one by name for configs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import numpy as np

from cmoe.errors import CMoEError, UnknownNameError, expect
from cmoe.reference_models.unimed.data.sample import Sample

UNIMED_RATIOS: dict[str, float] = {
    "medqa": 2, "pubmedqa": 2,
    "slake_vqa": 5, "pathvqa": 5,
    "slake_rec": 4, "slake_reg": 4, "samed2d_rec": 4, "samed2d_reg": 4,
    "medpix": 8, "mimic_cxr": 8,
    "dermamnist": 2, "organsmnist": 2,
}
"""Uni-Med's per-dataset sampling ratios (sum 50), keyed by this project's loader names, with MedMNIST split.

The original has one MedMNIST source with ratio 4 (``medmnist_2d_small``: DermaMNIST and OrganSMNIST
concatenated, so each batch is drawn from both by size, DermaMNIST about 1/3); these default ratios, for
configs that give none, keep them as two sources and split the 4 evenly (2 + 2). The ``paper`` config has the
original's mix: both entries set ``mix_source: medmnist_2d_small`` (drawn as one source, see
`TaskRatioSampler`'s ``groups``) with ratio 4.
"""

_RATIO_BLOCK = 1024
"""`TaskRatioSampler` draws sources in blocks of this many steps, each from its own seeded generator, so that
skipping ahead only replays the source draws of earlier blocks (vectorised), never their batches."""

_TAG_SOURCE_DRAWS, _TAG_SOURCE_CYCLE, _TAG_EPOCH = 0, 1, 2


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


class BatchSampler(ABC):
    """An endless, deterministic stream of batches of indices into ``samples``.

    ``iter(sampler)`` yields batches forever; ``iter_from(start)`` yields the same stream from batch ``start``
    on (resuming); ``take(n, start)`` is a finite slice of it for inspection and tests.
    """

    def __init__(self, samples: Sequence[Sample], batch_size: int, seed: int = 42) -> None:
        expect(len(samples) > 0, "samples", "at least one Sample", "an empty list")
        expect(isinstance(batch_size, int) and batch_size > 0, "batch_size", "a positive int", repr(batch_size))
        expect(isinstance(seed, (int, np.integer)) and seed >= 0, "seed", "a non-negative int", repr(seed))
        self.num_samples = len(samples)
        self.batch_size = batch_size
        self.seed = int(seed)

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_from(0)

    @abstractmethod
    def iter_from(self, start: int) -> Iterator[list[int]]:
        """The stream from batch ``start`` on: what ``iter(self)`` yields after skipping ``start`` batches."""

    def take(self, n: int, start: int = 0) -> list[list[int]]:
        """Batches ``start`` to ``start + n - 1`` of the stream."""
        return list(islice(self.iter_from(start), n))

    @staticmethod
    def _check_start(start: int) -> None:
        expect(isinstance(start, (int, np.integer)) and start >= 0, "start", "a non-negative int", repr(start))


class EpochBatchSampler(BatchSampler):
    """A sampler that walks all entries once per epoch, reshuffled per epoch from ``(seed, epoch)``.

    Every epoch has the same number of batches (`batches_per_epoch`): ``ceil(N / batch_size)``, the last one
    holding ``N mod batch_size`` entries when that is not zero, or ``N // batch_size`` full batches with
    ``drop_last`` (the tail entries of that epoch's order are then left out of that epoch).
    """

    def __init__(self, samples: Sequence[Sample], batch_size: int, seed: int = 42, drop_last: bool = False) -> None:
        super().__init__(samples, batch_size, seed)
        self.drop_last = bool(drop_last)
        count = len(samples) // batch_size if drop_last else math.ceil(len(samples) / batch_size)
        expect(count > 0, "batch_size", f"at most the number of entries ({len(samples)}) with drop_last",
               batch_size)
        self.batches_per_epoch = count

    @abstractmethod
    def epoch_order(self, epoch: int) -> np.ndarray:
        """All entry indices, each once, in the order epoch ``epoch`` visits them (cut into batches in order)."""

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of epoch ``epoch`` (0-based)."""
        expect(isinstance(epoch, (int, np.integer)) and epoch >= 0, "epoch", "a non-negative int", repr(epoch))
        order = self.epoch_order(int(epoch)).tolist()
        size = self.batch_size
        return [order[i * size:(i + 1) * size] for i in range(self.batches_per_epoch)]

    def iter_from(self, start: int) -> Iterator[list[int]]:
        self._check_start(start)
        epoch, offset = divmod(int(start), self.batches_per_epoch)
        while True:
            yield from self.epoch_batches(epoch)[offset:]
            epoch, offset = epoch + 1, 0


class MixedTaskSampler(EpochBatchSampler):
    """Plain shuffled batches over all entries: tasks and sources mix freely within a batch.

    Each epoch is a fresh permutation of all entries drawn from ``(seed, epoch)``.
    """

    def epoch_order(self, epoch: int) -> np.ndarray:
        return _rng(self.seed, _TAG_EPOCH, epoch).permutation(self.num_samples)


class ImageCentricSampler(EpochBatchSampler):
    """Batches that keep all entries of one image (same ``image_id``) together.

    Entries are grouped by ``image_id`` (entries without one, such as text-only QA, are singleton groups; give
    hash-merged ids first with `imax.MergedImages.samples` when datasets name the same image differently).
    Each epoch shuffles the groups from ``(seed, epoch)`` and packs them greedily into a stream that is cut
    into batches of exactly ``batch_size`` (the last batch of an epoch may be shorter):

    - the next group in shuffled order goes into the current batch whole if it fits in the space left;
    - if it does not and the current batch is partly filled, the first of the next ``lookahead`` groups that
      fits goes in instead (first fit), and the next group waits;
    - otherwise the next group is placed anyway and runs over into the following batch(es).

    So every group is contiguous in the epoch's order, and its entries always lie in one batch or in
    consecutive batches; a group no larger than ``batch_size`` is split across two batches only when neither
    it nor any of the next ``lookahead`` groups fits the space left, and a larger group spans
    ``ceil(size / batch_size)`` or one more consecutive batches. Batches stay full, so the number of batches per
    epoch is the same as for `MixedTaskSampler`. Entries of one group keep their dataset order.
    """

    def __init__(self, samples: Sequence[Sample], batch_size: int, seed: int = 42, drop_last: bool = False,
                 lookahead: int = 16) -> None:
        super().__init__(samples, batch_size, seed, drop_last)
        expect(isinstance(lookahead, int) and lookahead >= 0, "lookahead", "a non-negative int", repr(lookahead))
        self.lookahead = lookahead
        by_image: dict[str, list[int]] = {}
        groups: list[list[int]] = []
        for index, sample in enumerate(samples):
            if sample.image_id is None:
                groups.append([index])
            elif sample.image_id in by_image:
                by_image[sample.image_id].append(index)
            else:
                by_image[sample.image_id] = [index]
                groups.append(by_image[sample.image_id])
        self.groups: list[list[int]] = groups
        """The image groups (lists of entry indices), in order of first appearance."""

    def epoch_order(self, epoch: int) -> np.ndarray:
        groups, size = self.groups, self.batch_size
        sizes = [len(group) for group in groups]
        shuffled = _rng(self.seed, _TAG_EPOCH, epoch).permutation(len(groups)).tolist()
        used = [False] * len(shuffled)
        order: list[int] = []
        head = 0
        while head < len(shuffled):
            if used[head]:
                head += 1
                continue
            space = size - len(order) % size
            pick = head
            if space < size and sizes[shuffled[head]] > space:
                scanned, j = 0, head + 1
                while j < len(shuffled) and scanned < self.lookahead:
                    if not used[j]:
                        scanned += 1
                        if sizes[shuffled[j]] <= space:
                            pick = j
                            break
                    j += 1
            used[pick] = True
            order.extend(groups[shuffled[pick]])
        return np.asarray(order, dtype=np.int64)


class _SourceCycle:
    """One source's endless stream: its entries in a fresh permutation per pass, passes concatenated."""

    def __init__(self, indices: np.ndarray, seed: int, source_index: int, position: int) -> None:
        self.indices, self.seed, self.source_index, self.position = indices, seed, source_index, position
        self._pass, self._perm = -1, indices

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        n = len(self.indices)
        while len(out) < count:
            cycle, offset = divmod(self.position, n)
            if cycle != self._pass:
                self._pass = cycle
                self._perm = self.indices[_rng(self.seed, _TAG_SOURCE_CYCLE, self.source_index, cycle).permutation(n)]
            step = min(count - len(out), n - offset)
            out.extend(self._perm[offset:offset + step].tolist())
            self.position += step
        return out


class TaskRatioSampler(BatchSampler):
    """Uni-Med's mixing: each batch is ``batch_size`` entries of one source drawn with probability ∝ its ratio.

    ``ratios`` maps every source present in ``samples`` (``Sample.source``) to a positive weight (default
    `UNIMED_RATIOS`). Each source walks its own endless cycle (a fresh permutation of its entries per pass, so
    every entry of a source is seen once before any is seen twice; a batch may run over a pass boundary, and a
    source with fewer entries than ``batch_size`` repeats entries within a batch). A ratio for a source with no
    entries is an error unless ``ignore_absent`` is set, in which case it is dropped and the remaining ratios
    renormalised. ``groups`` maps a ``Sample.source`` to the source it is drawn in: sources mapped to one name
    are one source here (one ratio, one cycle over all their entries), so each one's share of that source's
    batches follows its number of entries, as the original's concatenated MedMNIST sets.
    """

    def __init__(self, samples: Sequence[Sample], batch_size: int, seed: int = 42,
                 ratios: Mapping[str, float] | None = None, ignore_absent: bool = False,
                 groups: Mapping[str, str] | None = None) -> None:
        super().__init__(samples, batch_size, seed)
        ratios = dict(UNIMED_RATIOS if ratios is None else ratios)
        groups = dict(groups or {})
        by_source: dict[str, list[int]] = {}
        for index, sample in enumerate(samples):
            by_source.setdefault(groups.get(sample.source, sample.source), []).append(index)
        missing = sorted(set(by_source) - set(ratios))
        absent = [] if ignore_absent else sorted(set(ratios) - set(by_source))
        bad = sorted(name for name in set(by_source) & set(ratios)
                     if not (isinstance(ratios[name], (int, float)) and math.isfinite(ratios[name])
                             and ratios[name] > 0))
        problems = []
        if missing:
            problems.append(f"no ratio for sources present in the data: {', '.join(map(repr, missing))}")
        if absent:
            problems.append(f"ratios given for sources with no entries: {', '.join(map(repr, absent))} "
                            "(pass ignore_absent=True to drop them)")
        if bad:
            problems.append("ratios must be positive finite numbers: "
                            + ", ".join(f"{name!r}={ratios[name]!r}" for name in bad))
        if problems:
            raise CMoEError("ratios: " + "; ".join(problems))
        self.sources: list[str] = sorted(by_source)
        """The sources, sorted by name; a source's position here keys its random stream."""
        weights = np.asarray([float(ratios[name]) for name in self.sources])
        self.probabilities: dict[str, float] = dict(zip(self.sources, (weights / weights.sum()).tolist()))
        """Each source's probability of being drawn for a batch (normalised ratios)."""
        self._cdf = np.cumsum(weights) / weights.sum()
        self._indices = [np.asarray(by_source[name], dtype=np.int64) for name in self.sources]

    def _block_draws(self, block: int) -> np.ndarray:
        uniform = _rng(self.seed, _TAG_SOURCE_DRAWS, block).random(_RATIO_BLOCK)
        return np.minimum(np.searchsorted(self._cdf, uniform, side="right"), len(self.sources) - 1)

    def source_sequence(self, n: int, start: int = 0) -> list[str]:
        """The sources of batches ``start`` to ``start + n - 1`` (cheap: no batch is built)."""
        self._check_start(start)
        first, last = int(start) // _RATIO_BLOCK, (int(start) + n - 1) // _RATIO_BLOCK
        draws = np.concatenate([self._block_draws(b) for b in range(first, last + 1)]) if n > 0 else []
        offset = int(start) - first * _RATIO_BLOCK
        return [self.sources[s] for s in np.asarray(draws[offset:offset + n], dtype=np.int64).tolist()]

    def iter_from(self, start: int) -> Iterator[list[int]]:
        self._check_start(start)
        block, offset = divmod(int(start), _RATIO_BLOCK)
        consumed = np.zeros(len(self.sources), dtype=np.int64)
        for earlier in range(block):
            consumed += np.bincount(self._block_draws(earlier), minlength=len(self.sources))
        draws = self._block_draws(block)
        consumed += np.bincount(draws[:offset], minlength=len(self.sources))
        cycles = [_SourceCycle(indices, self.seed, s, int(consumed[s]) * self.batch_size)
                  for s, indices in enumerate(self._indices)]
        while True:
            for source in draws[offset:].tolist():
                yield cycles[source].take(self.batch_size)
            block, offset = block + 1, 0
            draws = self._block_draws(block)


SAMPLERS: dict[str, type[BatchSampler]] = {
    "task_ratio": TaskRatioSampler,
    "mixed": MixedTaskSampler,
    "image_centric": ImageCentricSampler,
}
"""Sampler classes by the name configs use."""


def build_sampler(kind: str, samples: Sequence[Sample], batch_size: int, seed: int = 42,
                  **options: Any) -> BatchSampler:
    """The sampler called ``kind`` with its ``options``: ``task_ratio`` (``ratios``, ``ignore_absent``, ``groups``),
    ``mixed`` (``drop_last``) or ``image_centric`` (``drop_last``, ``lookahead``)."""
    if kind not in SAMPLERS:
        raise UnknownNameError("sampler", kind, SAMPLERS)
    return SAMPLERS[kind](samples, batch_size, seed, **options)
