"""IncrementalDetokenizer against full ``tokenizer.decode`` of the same ids, on the tiny tokenizer."""

from __future__ import annotations

import random

import numpy as np
import pytest
import transformers

from jaxpaged.converters.tiny import build_tiny_checkpoint
from jaxpaged.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from jaxpaged.sampling_params import SamplingParams

MULTIBYTE_TEXT = "héllo wörld ☃ 日本語 🙂"
PLAIN_TEXT = "We walked along the river, counted the boats, and talked about the books"
SPECIAL_NAMES = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> transformers.PreTrainedTokenizerBase:
    model_dir = build_tiny_checkpoint("llama-mha", tmp_path_factory.mktemp("detok") / "tiny")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def make(tokenizer, **params) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tokenizer, [1, 2, 3], SamplingParams(**params))


def stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> tuple[list[str], str | None]:
    """Feeds the chunks, collecting streamed deltas; the last delta is taken with finished=True."""
    deltas, stop = [], None
    for chunk in chunks:
        stop = detok.update(chunk)
        deltas.append(detok.get_next_output_text(finished=stop is not None, delta=True))
        if stop is not None:
            return deltas, stop
    deltas.append(detok.get_next_output_text(finished=True, delta=True))
    return deltas, stop


def one_at_a_time(ids: list[int]) -> list[list[int]]:
    return [[t] for t in ids]


def random_chunks(ids: list[int], rng: random.Random, max_chunk: int = 4) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        size = rng.randint(1, max_chunk)
        chunks.append(ids[i:i + size])
        i += size
    return chunks


# ----------------------------------------------------------------------------------------------
# Text equals the full decode; characters come out whole


def test_multibyte_text_one_token_at_a_time_never_streams_replacement_char(tokenizer):
    ids = encode(tokenizer, MULTIBYTE_TEXT)
    assert tokenizer.decode(ids) == MULTIBYTE_TEXT
    detok = make(tokenizer)
    deltas = []
    for k, token in enumerate(ids, start=1):
        detok.update([token])
        deltas.append(detok.get_next_output_text(finished=False, delta=True))
        # Independent reference: the full decode of the ids so far, minus an incomplete last char.
        expected = tokenizer.decode(ids[:k]).removesuffix("\ufffd")
        assert detok.output_text == expected
    deltas.append(detok.get_next_output_text(finished=True, delta=True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == MULTIBYTE_TEXT == detok.output_text
    assert deltas.count("") >= 8  # the text's characters span several tokens: many steps wait


@pytest.mark.parametrize("seed", range(3))
def test_multibyte_text_in_random_chunks(tokenizer, seed):
    text = MULTIBYTE_TEXT + " " + PLAIN_TEXT + " 🙂🙂日本"
    ids = encode(tokenizer, text)
    deltas, stop = stream(make(tokenizer), random_chunks(ids, random.Random(seed)))
    assert stop is None
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_random_token_streams_concatenate_to_full_decode(tokenizer, seed, skip_special_tokens):
    rng = random.Random(seed)
    vocab = len(tokenizer)  # 442 ids: 256 bytes, merges, then the special tokens
    ids = [rng.randrange(vocab) for _ in range(300)]
    # Runs of raw high bytes: invalid and incomplete UTF-8 that a full decode turns into U+FFFD.
    ids += [rng.randrange(100, 190) for _ in range(40)]
    detok = make(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas, _ = stream(detok, random_chunks(ids, rng, max_chunk=3))
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == expected == detok.output_text
    assert detok.output_token_ids == ids


def test_incomplete_character_at_end_is_released_only_when_finished(tokenizer):
    ids = encode(tokenizer, "ab日")[:-1]  # "ab" + 2 of the 3 bytes of "日"
    detok = make(tokenizer)
    detok.update(ids)
    assert detok.output_text == "ab"
    assert detok.get_next_output_text(finished=False, delta=True) == "ab"
    assert detok.get_next_output_text(finished=True, delta=True) == "\ufffd"
    assert detok.output_text == tokenizer.decode(ids) == "ab\ufffd"
    assert detok.get_next_output_text(finished=True, delta=True) == ""


def test_cost_per_update_does_not_grow_with_output_length(tokenizer):
    class CountingBackend:
        def __init__(self, backend):
            self.backend, self.lengths = backend, []

        def decode(self, ids, skip_special_tokens):
            self.lengths.append(len(ids))
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = encode(tokenizer, (MULTIBYTE_TEXT + " " + PLAIN_TEXT + " ") * 20)
    detok = make(tokenizer)
    counter = CountingBackend(detok._backend)
    detok._backend = counter  # white-box: count the work each update does
    for token in ids:
        detok.update([token])
    assert len(ids) > 1000
    assert detok.output_text == tokenizer.decode(ids)
    assert max(counter.lengths) <= 8  # a window of a few tokens, never the whole output
    assert len(counter.lengths) <= 2 * len(ids)


def test_accepts_numpy_ids(tokenizer):
    ids = encode(tokenizer, PLAIN_TEXT)
    detok = make(tokenizer)
    detok.update(np.asarray(ids[:5], dtype=np.int32))
    detok.update(np.asarray(ids[5:], dtype=np.int64))
    assert detok.output_text == PLAIN_TEXT


# ----------------------------------------------------------------------------------------------
# Special tokens


def special_stream(tokenizer) -> list[int]:
    eot, eos, header = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>",
                                                        "<|start_header_id|>"])
    return (encode(tokenizer, "Hello") + [eot] + encode(tokenizer, " wörld") + [header, eot]
            + encode(tokenizer, "日") + [eos])


@pytest.mark.parametrize("spaces_between_special_tokens", [True, False])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_in_stream(tokenizer, skip_special_tokens, spaces_between_special_tokens):
    ids = special_stream(tokenizer)
    detok = make(tokenizer, skip_special_tokens=skip_special_tokens,
                 spaces_between_special_tokens=spaces_between_special_tokens)
    deltas, _ = stream(detok, one_at_a_time(ids))
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == detok.output_text == expected
    if skip_special_tokens:
        assert expected == "Hello wörld日"
    else:
        assert expected == "Hello<|eot_id|> wörld<|start_header_id|><|eot_id|>日<|end_of_text|>"


def test_run_of_skipped_special_tokens_then_text(tokenizer):
    specials = tokenizer.convert_tokens_to_ids(list(SPECIAL_NAMES))
    ids = encode(tokenizer, " a") + specials * 3 + encode(tokenizer, " bé")
    detok = make(tokenizer)
    deltas, _ = stream(detok, one_at_a_time(ids))
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == " a bé"


# ----------------------------------------------------------------------------------------------
# Stop strings


def test_find_stop_string_picks_the_match_that_completes_first():
    assert find_stop_string("xabcd", 1, ["cd", "b"]) == ("b", 2)
    assert find_stop_string("xabcd", 1, ["b", "ab"]) == ("ab", 1)  # same end: the longer one
    assert find_stop_string("abcab", 3, ["ab"]) == ("ab", 3)  # the old "ab" was checked before
    assert find_stop_string("abcab", 4, ["ca"]) is None
    assert find_stop_string("abcab", 3, ["ca"]) == ("ca", 2)  # ends in the new text


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stop_str", ["engine re", "s", ", spl"])
def test_stop_string_split_across_tokens(tokenizer, stop_str, include):
    text = "The small engine reads a prompt, splits it"
    ids = encode(tokenizer, text)
    detok = make(tokenizer, stop=[stop_str, "never"], include_stop_str_in_output=include)
    deltas, stop = stream(detok, one_at_a_time(ids))
    cut = text.index(stop_str) + (len(stop_str) if include else 0)
    assert stop == stop_str == detok.stop_string
    assert detok.output_text == "".join(deltas) == text[:cut]
    # Stopped at the token that completed the stop string, not later.
    assert len(detok.output_token_ids) == next(
        k for k in range(1, len(ids) + 1) if stop_str in tokenizer.decode(ids[:k]))


@pytest.mark.parametrize("include", [False, True])
def test_stop_inside_one_multi_token_update_drops_the_rest(tokenizer, include):
    text = "counted the boats, and talked about the books"
    ids = encode(tokenizer, text)
    detok = make(tokenizer, stop=["boats"], include_stop_str_in_output=include)
    assert detok.update(ids[:2]) is None
    assert detok.update(ids[2:]) == "boats"
    assert detok.output_text == ("counted the boats" if include else "counted the ")
    # Ids sampled after the stop (the engine may run a step ahead) add no text.
    assert detok.update(encode(tokenizer, " boats")) is None
    assert detok.output_text == ("counted the boats" if include else "counted the ")
    assert detok.get_next_output_text(finished=True, delta=False) == detok.output_text


@pytest.mark.parametrize("include", [False, True])
def test_multibyte_stop_string_split_across_byte_tokens(tokenizer, include):
    ids = encode(tokenizer, MULTIBYTE_TEXT)
    detok = make(tokenizer, stop=["日本"], include_stop_str_in_output=include)
    deltas, stop = stream(detok, one_at_a_time(ids))
    assert stop == "日本"
    expected = "héllo wörld ☃ 日本" if include else "héllo wörld ☃ "
    assert detok.output_text == "".join(deltas) == expected
    assert all("\ufffd" not in d for d in deltas)


def test_stop_buffer_holds_back_partial_match_and_releases_it_at_finish(tokenizer):
    text = "We walked along the river, counted"
    ids = encode(tokenizer, text)
    detok = make(tokenizer, stop=["rivers", "xy"])  # "river" is a partial match that never completes
    streamed = ""
    for token in ids:
        assert detok.update([token]) is None
        streamed += detok.get_next_output_text(finished=False, delta=True)
        assert streamed == detok.output_text[:max(0, len(detok.output_text) - 5)]
        full_so_far = detok.get_next_output_text(finished=False, delta=False)
        assert full_so_far == streamed
    assert streamed == text[:-5]
    assert detok.get_next_output_text(finished=True, delta=True) == text[-5:]
    assert detok.get_next_output_text(finished=True, delta=False) == text


def test_stop_string_split_across_steps_is_never_streamed(tokenizer):
    text = "We walked along the river, counted the boats"
    ids = encode(tokenizer, text)
    detok = make(tokenizer, stop=["the river"])
    streamed = []
    for token in ids:
        stop = detok.update([token])
        streamed.append(detok.get_next_output_text(finished=stop is not None, delta=True))
        if stop:
            break
    assert stop == "the river"
    assert "".join(streamed) == "We walked along "
    assert not any("the" in piece or "riv" in piece for piece in streamed)


def test_include_stop_str_streams_without_holding_back(tokenizer):
    ids = encode(tokenizer, PLAIN_TEXT)
    detok = make(tokenizer, stop=["zebras"], include_stop_str_in_output=True)
    for token in ids:
        detok.update([token])
        assert detok.get_next_output_text(finished=False, delta=False) == detok.output_text


def test_min_tokens_ignores_stop_strings_in_the_first_tokens(tokenizer):
    text = "the boats, the boats, the boats"
    ids = encode(tokenizer, text)
    first_boats_end = next(k for k in range(1, len(ids)) if "boats" in tokenizer.decode(ids[:k]))
    detok = make(tokenizer, stop=["boats"], min_tokens=first_boats_end, max_tokens=100)
    deltas, stop = stream(detok, one_at_a_time(ids))
    assert stop == "boats"
    assert detok.output_text == "".join(deltas) == "the boats, the "


# ----------------------------------------------------------------------------------------------
# detokenize=False and bad input


def test_detokenize_false_gives_empty_text(tokenizer):
    ids = encode(tokenizer, MULTIBYTE_TEXT)
    detok = make(tokenizer, detokenize=False)
    assert detok.update(ids) is None
    assert detok.output_text == ""
    assert detok.get_next_output_text(finished=False, delta=True) == ""
    assert detok.get_next_output_text(finished=True, delta=False) == ""
    assert detok.output_token_ids == ids


def test_stop_strings_need_detokenize(tokenizer):
    with pytest.raises(ValueError, match="detokenize"):
        make(tokenizer, detokenize=False, stop=["x"])


def test_rejects_a_non_fast_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        IncrementalDetokenizer(object(), [1], SamplingParams())


@pytest.mark.parametrize("bad", [["a"], [1.5], [-1], [None]])
def test_rejects_bad_token_ids(tokenizer, bad):
    detok = make(tokenizer)
    with pytest.raises(ValueError, match="new_token_ids"):
        detok.update(bad)
