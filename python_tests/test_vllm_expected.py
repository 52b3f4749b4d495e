"""The project's own ``generate()`` on the prompt that test_vllm_generate.py runs through vLLM.

``EXPECTED`` is what ``generate()`` with ``WeightedKVCache(budget=256)`` produces (8 greedy tokens
after the 1024-token prompt cut from the embedded default text at token 300, where
``compare.prompts((100, 200, 1024))`` puts it): test_vllm_generate.py checks the vLLM plugin
against it in the vLLM venv (transformers < 5.20 there, so generate() cannot run in it), and the
test below keeps it true in the main environment. Slow (one generate() on 1024 tokens, ~2 min).
"""
import pytest

PLUGIN = "budget=256"
LENGTHS = (100, 200, 1024)
NEW = 8
# compare.run_hf(prompts(LENGTHS), NEW, PLUGIN)["outputs"][2]
EXPECTED = [3187, 282, 1967, 282, 1123, 284, 8505, 30]


@pytest.mark.slow
def test_expected_is_generate_with_weightedkvcache():
    transformers = pytest.importorskip("transformers")
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.23"):
        pytest.skip("the transformers integration needs transformers >= 5.23 (main venv)")
    from transformers import AutoTokenizer

    from weightedkv_ext.models import SMOLLM2_GGUF, smollm2_folder
    from weightedkv_ext.vllm import compare

    # load_smollm2()'s tokenizer, without the weights (run_hf loads the model)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    prompt = compare.prompts(LENGTHS, tokenizer)[2]
    assert len(prompt) == 1024
    got = compare.run_hf([prompt], NEW, PLUGIN)
    assert got["outputs"][0] == EXPECTED
    assert got["held_tokens"][0] == 256  # compressed (vLLM's full-cache output differs at token
    # 2: test_vllm_generate.py checks that side)
