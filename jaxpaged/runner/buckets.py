"""Static shape ladders: every step is padded up to one of a few shapes, compiled once each.

A step has three sizes: tokens T, sequences S and block-table width W.
  - decode-only steps: T == S, one shape per entry of the sequence ladder (powers of two, and
    from ``DECODE_HALF_STEPS_FROM`` sequences on also the sizes halfway between);
  - mixed steps (any prefill chunk): one shape per entry of the token ladder, with
    S = min(T, max_num_seqs). Padding sequence rows cost almost nothing (empty query ranges; a
    few extra logits rows), and tying S to T keeps the compile count at len(tokens) + len(seqs)
    instead of their product;
  - W is one fixed width (every table row padded to the most blocks a sequence can own): the
    attention kernels loop only over each sequence's real pages, so width costs transfer bytes,
    not compute.
"""

from __future__ import annotations

import bisect
import dataclasses


# Decode steps of this many sequences and more also get buckets halfway between powers of two.
# There the GEMMs of a padded step approach compute-bound (a Llama-3-8B step turns compute-bound
# at a few hundred rows), so padding rows cost time; with 1.5x steps at most a third of a step's
# rows are padding (up to half with powers of two alone). Measured faster on nano in an A/B of one
# GPU call: bench/RESULTS.md, "fourth run".
DECODE_HALF_STEPS_FROM = 64


def _ladder(minimum: int, maximum: int, half_steps_from: int | None = None) -> tuple[int, ...]:
    """Powers of two from ``minimum`` up to (and always including) ``maximum``; from
    ``half_steps_from`` on also 1.5x each power of two (64, 96, 128, 192, ...)."""
    sizes, size = [], minimum
    while size < maximum:
        sizes.append(size)
        if half_steps_from is not None and size >= half_steps_from and size * 3 // 2 < maximum:
            sizes.append(size * 3 // 2)
        size *= 2
    sizes.append(maximum)
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class StepShape:
    num_tokens: int  # T
    num_seqs: int  # S
    decode_only: bool  # T == S and every sequence has exactly one new token


@dataclasses.dataclass(frozen=True)
class BucketLadder:
    token_sizes: tuple[int, ...]
    seq_sizes: tuple[int, ...]
    table_width: int  # W, blocks per table row

    @classmethod
    def create(cls, *, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
               block_size: int, min_tokens: int = 16) -> "BucketLadder":
        return cls(token_sizes=_ladder(min(min_tokens, max_num_batched_tokens),
                                       max_num_batched_tokens),
                   seq_sizes=_ladder(1, max_num_seqs, DECODE_HALF_STEPS_FROM),
                   table_width=-(-max_model_len // block_size))

    def shape_for(self, num_tokens: int, num_seqs: int, decode_only: bool) -> StepShape:
        if decode_only:
            s = _round_up(self.seq_sizes, num_seqs, "sequences")
            return StepShape(num_tokens=s, num_seqs=s, decode_only=True)
        return self._mixed(_round_up(self.token_sizes, num_tokens, "tokens"))

    def _mixed(self, num_tokens: int) -> StepShape:
        return StepShape(num_tokens=num_tokens, num_seqs=min(num_tokens, self.seq_sizes[-1]),
                         decode_only=False)

    def all_shapes(self) -> list[StepShape]:
        """Every shape a step can take: what warm-up compiles."""
        return ([StepShape(s, s, True) for s in self.seq_sizes]
                + [self._mixed(t) for t in self.token_sizes])

    @property
    def sampler_batch_sizes(self) -> tuple[int, ...]:
        """Every S a step can have, so every batch size the sampler sees."""
        return tuple(sorted(set(self.seq_sizes) | {self._mixed(t).num_seqs
                                                   for t in self.token_sizes}))


def _round_up(sizes: tuple[int, ...], n: int, what: str) -> int:
    i = bisect.bisect_left(sizes, n)
    if i == len(sizes):
        raise ValueError(f"{n} {what} exceed the largest step bucket {sizes[-1]}")
    return sizes[i]
