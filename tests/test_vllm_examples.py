"""vLLM's documented offline examples run unchanged but for the import (and a local model path:
there is no model hub here)."""

import contextlib
import io

import pytest

# vllm/examples/offline_inference/basic/basic.py
BASIC = '''
from vllm import LLM, SamplingParams

# Sample prompts.
prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
# Create a sampling params object.
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)


def main():
    # Create an LLM.
    llm = LLM(model="facebook/opt-125m")
    # Generate texts from the prompts.
    # The output is a list of RequestOutput objects
    # that contain the prompt, generated text, and other information.
    outputs = llm.generate(prompts, sampling_params)
    # Print the outputs.
    print("\\nGenerated Outputs:\\n" + "-" * 60)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt:    {prompt!r}")
        print(f"Output:    {generated_text!r}")
        print("-" * 60)


if __name__ == "__main__":
    main()
'''

# Parallel sampling as the vLLM docs show it: n completions per prompt, seeded.
PARALLEL = '''
from vllm import LLM, SamplingParams

llm = LLM(model="facebook/opt-125m")
sampling_params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=16, seed=42)
outputs = llm.generate(["The future of AI is", "Once upon a time"], sampling_params)
for output in outputs:
    print(f"Prompt: {output.prompt!r}")
    for completion in output.outputs:
        print(f"  [{completion.index}] {completion.text!r} ({len(completion.token_ids)} tokens, "
              f"finish_reason={completion.finish_reason})")
'''


def run_example(source: str, model_dir) -> str:
    code = (source.replace("from vllm import", "from jaxpaged import")
            .replace('"facebook/opt-125m"', repr(str(model_dir))))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, "<vllm example>", "exec"), {"__name__": "__main__"})
    return stdout.getvalue()


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama3-rope")


def test_basic_offline_inference_example(model_dir):
    out = run_example(BASIC, model_dir)
    assert out.count("Prompt:    ") == 4 and out.count("Output:    ") == 4
    assert "'The capital of France is'" in out


def test_parallel_sampling_example(model_dir):
    out = run_example(PARALLEL, model_dir)
    assert out.count("Prompt: ") == 2
    for index in range(3):
        assert out.count(f"  [{index}] ") == 2
    assert out.count("(16 tokens, finish_reason=length)") + out.count("finish_reason=stop") == 6
