"""The static step-shape ladder: which padded shape each step gets, and how much it pads."""

import pytest

from jaxpaged.runner.buckets import DECODE_HALF_STEPS_FROM, BucketLadder, StepShape


def make_ladder(max_num_seqs: int = 256, max_num_batched_tokens: int = 8192) -> BucketLadder:
    return BucketLadder.create(max_num_batched_tokens=max_num_batched_tokens,
                               max_num_seqs=max_num_seqs, max_model_len=4096, block_size=16)


def test_sequence_ladder_has_half_steps_from_the_threshold_on():
    assert make_ladder(256).seq_sizes == (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)
    assert make_ladder(512).seq_sizes == (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)
    assert make_ladder(DECODE_HALF_STEPS_FROM).seq_sizes == (1, 2, 4, 8, 16, 32, 64)
    assert make_ladder(100).seq_sizes == (1, 2, 4, 8, 16, 32, 64, 96, 100)  # the cap is a bucket


def test_token_ladder_stays_powers_of_two():
    assert make_ladder().token_sizes == (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def test_decode_steps_take_the_next_bucket_padded_at_most_a_third_above_the_threshold():
    ladder = make_ladder(256)
    for num_seqs in range(1, 257):
        shape = ladder.shape_for(num_seqs, num_seqs, decode_only=True)
        assert shape.decode_only and shape.num_tokens == shape.num_seqs >= num_seqs
        smaller = [s for s in ladder.seq_sizes if s < shape.num_seqs]
        assert not smaller or smaller[-1] < num_seqs  # the smallest bucket that fits
        if num_seqs > DECODE_HALF_STEPS_FROM:
            assert shape.num_seqs - num_seqs <= shape.num_seqs / 3  # padding rows of the step


def test_mixed_steps_tie_sequences_to_tokens():
    ladder = make_ladder(256)
    assert ladder.shape_for(100, 3, decode_only=False) == StepShape(128, 128, False)
    assert ladder.shape_for(5000, 40, decode_only=False) == StepShape(8192, 256, False)


def test_every_shape_is_warmed_up_and_sampled():
    ladder = make_ladder(256)
    shapes = ladder.all_shapes()
    assert len(shapes) == len(set(shapes)) == len(ladder.seq_sizes) + len(ladder.token_sizes)
    assert set(ladder.sampler_batch_sizes) == {s.num_seqs for s in shapes}


def test_steps_beyond_the_largest_bucket_are_refused():
    ladder = make_ladder(256)
    with pytest.raises(ValueError, match="257 sequences exceed the largest step bucket 256"):
        ladder.shape_for(257, 257, decode_only=True)
    with pytest.raises(ValueError, match="tokens exceed"):
        ladder.shape_for(8193, 8, decode_only=False)
