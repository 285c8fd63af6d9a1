"""Beam search goldens from Hugging Face transformers (torch, CPU, fp32) for `llama3-rope`.

Run with the torch venv (not the project's .venv, which has no torch):

    /tmp/torch311/bin/python tests/golden/make_beam_goldens.py

Writes `tests/golden/beam_search.npz` (no pickled objects). For prompt i of `llama3-rope.npz`
(7, 20 and 38 tokens) and beam width k in WIDTHS:

    hf_ids_{i}_{k}        int32 [k, N]  HF `generate(num_beams=k, num_return_sequences=k,
                                        do_sample=False, length_penalty=1.0, early_stopping=False,
                                        min_new_tokens=N, max_new_tokens=N)`: EOS cannot end a beam
    hf_cum_{i}_{k}        float64 [k]   their cumulative logprobs (HF's sequences_scores * N: HF
                                        divides by the generated length; all beams have N tokens)

(`cases` int32 [C, 2] lists the (i, k) present), and one case where an EOS ends beams early (prompt EOS_PROMPT, width EOS_WIDTH):

    eos_token_id          int32 []      an id the no-EOS search proposes early, made the EOS
    eos_ids_{r}           int32 [*]     rank r's tokens (prompt included) from vLLM's algorithm
    eos_cum               float64 [k]   their cumulative logprobs
    eos_finished          bool [k]      whether rank r ended with EOS

HF and vLLM rank beams alike when no EOS ends one (every beam has the same length, so both
scores order by the cumulative logprob, and the top 2k candidates of each beam hold the global
top k), which `reference_beam_search` (vLLM's `LLM.beam_search` over full forward passes of the
HF model) is checked against here. With an EOS they differ: HF only lets an EOS candidate among
the best k of the step finish a beam, scores it by the generated length, and (early_stopping
False) may stop before max_new_tokens; vLLM finishes every EOS among each beam's 2k candidates,
scores by the whole length (prompt included, EOS not) and always runs max_tokens steps. So the
EOS case is vLLM's algorithm on HF's model, not HF's `generate`.

A (prompt, width) whose k-th and (k+1)-th candidates of some step are closer than MIN_GAP is
fragile (fp32 rounding may flip it) and gets no golden; `cases` lists those that have one. A
fragile EOS case is refused.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys
import tempfile

import numpy as np
import torch
import transformers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from converters import tiny  # noqa: E402
from make_goldens import load_model  # noqa: E402

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent
MODEL = "llama3-rope"
NUM_NEW_TOKENS = 12  # the prompts end 7 + 12, 20 + 12 and 38 + 12 tokens: on and off blocks of 16
WIDTHS = (2, 4)
EOS_PROMPT, EOS_WIDTH = 1, 4
MIN_GAP = 1e-4  # in score (cum_logprob / length) units


def last_logprobs(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, -1].float()  # [V]
    return torch.log_softmax(logits, dim=-1)


def score(tokens: list[int], cum: float, eos: int | None) -> float:
    return cum / (len(tokens) - (1 if eos is not None and tokens[-1] == eos else 0))


def reference_beam_search(model, prompt: list[int], width: int, steps: int, eos: int | None):
    """vLLM's LLM.beam_search (length_penalty 1.0): -> ([(tokens, cum, finished)], min gap)."""
    beams, completed, gaps = [(list(prompt), 0.0)], [], []
    for _ in range(steps):
        candidates = []
        for tokens, cum in beams:
            top = torch.topk(last_logprobs(model, tokens), 2 * width)
            for token, logprob in zip(top.indices.tolist(), top.values.tolist()):
                entry = (tokens + [token], cum + logprob)
                (completed if token == eos else candidates).append(entry)
        candidates.sort(key=lambda c: score(*c, eos), reverse=True)
        gaps.append(score(*candidates[width - 1], eos) - score(*candidates[width], eos))
        beams = candidates[:width]
    ranked = sorted(completed + beams, key=lambda c: score(*c, eos), reverse=True)[:width]
    return [(t, c, eos is not None and t[-1] == eos) for t, c in ranked], min(gaps)


def hf_beam_search(model, prompt: list[int], width: int, pad_id: int):
    input_ids = torch.tensor([prompt])
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, num_beams=width,
        num_return_sequences=width, length_penalty=1.0, early_stopping=False,
        max_new_tokens=NUM_NEW_TOKENS, min_new_tokens=NUM_NEW_TOKENS, pad_token_id=pad_id,
        return_dict_in_generate=True, output_scores=True)
    ids = out.sequences[:, len(prompt):].numpy().astype(np.int32)  # [k, N]
    cum = out.sequences_scores.double().numpy() * NUM_NEW_TOKENS  # [k]
    return ids, cum


def main() -> None:
    prompts = np.load(GOLDEN_DIR / f"{MODEL}.npz")
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny.build_tiny_checkpoint(MODEL, pathlib.Path(tmp) / MODEL)
        config = json.loads((model_dir / "config.json").read_text())
        model = load_model(model_dir)
        arrays["model_sha256"] = np.array(
            hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest())
        cases: list[tuple[int, int]] = []
        for i in range(3):
            prompt = prompts[f"prompt_ids_{i}"].tolist()
            for width in WIDTHS:
                ids, cum = hf_beam_search(model, prompt, width, config["eos_token_id"])
                ref, gap = reference_beam_search(model, prompt, width, NUM_NEW_TOKENS, None)
                if gap < MIN_GAP:  # a near tie fp32 rounding may flip: no golden for it
                    print(f"prompt {i} width {width}: fragile step (gap {gap:.2e}), skipped")
                    continue
                ref_ids = np.array([t[len(prompt):] for t, _, _ in ref], np.int32)
                if not np.array_equal(ids, ref_ids):
                    raise RuntimeError(f"prompt {i} width {width}: HF {ids} != reference "
                                       f"{ref_ids}")
                if not np.allclose(cum, [c for _, c, _ in ref], atol=1e-4):
                    raise RuntimeError(f"prompt {i} width {width}: HF scores differ")
                arrays[f"hf_ids_{i}_{width}"] = ids
                arrays[f"hf_cum_{i}_{width}"] = cum
                cases.append((i, width))
        arrays["cases"] = np.array(cases, np.int32)  # [C, 2]: (prompt, width) with goldens
        prompt = prompts[f"prompt_ids_{EOS_PROMPT}"].tolist()
        plain, _ = reference_beam_search(model, prompt, EOS_WIDTH, NUM_NEW_TOKENS, None)
        eos = plain[0][0][len(prompt) + 2]  # the best beam's third token: ends beams at step 3
        ranked, gap = reference_beam_search(model, prompt, EOS_WIDTH, NUM_NEW_TOKENS, eos)
        if gap < MIN_GAP:
            raise RuntimeError(f"EOS case: fragile step, gap {gap:.2e}")
        if not any(finished for _, _, finished in ranked):
            raise RuntimeError("EOS case: no returned beam ended with EOS")
        arrays["eos_token_id"] = np.array(eos, np.int32)
        for r, (tokens, _, _) in enumerate(ranked):
            arrays[f"eos_ids_{r}"] = np.asarray(tokens, np.int32)
        arrays["eos_cum"] = np.array([c for _, c, _ in ranked], np.float64)
        arrays["eos_finished"] = np.array([f for _, _, f in ranked])
    arrays["versions"] = np.array(json.dumps({"torch": torch.__version__,
                                              "transformers": transformers.__version__}))
    np.savez(GOLDEN_DIR / "beam_search.npz", **arrays)
    print({k: v.shape for k, v in arrays.items()})
    print("finished by EOS:", arrays["eos_finished"], [len(arrays[f"eos_ids_{r}"])
                                                       for r in range(EOS_WIDTH)])


if __name__ == "__main__":
    main()
