"""The vLLM plugin's settings (``WEIGHTEDKV_VLLM``): run in the main environment, no vLLM needed."""
import importlib.util

import pytest

from weightedkv_ext.vllm import settings


def test_defaults_are_weightedkvcache_defaults():
    s = settings.parse("budget=256")
    from weightedkv_ext import WeightedKVCache

    c = WeightedKVCache(budget=256)
    assert (s.budget, s.sinks, s.recent, s.policy, s.chunk_size, s.group_reduce) == \
        (c.budget, c.sinks, c.recent, c.policy, c.chunk_size, c.group_reduce)
    assert s.recent == 256 // 2 - 4
    assert s.capacity == 256 + 128  # the slots of one WeightedKVCache layer row
    assert s.window == s.capacity + 1  # vLLM keeps the last window - 1 tokens' blocks


def test_all_keys():
    s = settings.parse(" budget=64, policy=h2o,sinks=2,recent=10,chunk_size=16,cam_window=8,"
                       "seed=3,group_reduce=max ")
    assert s == settings.Settings(budget=64, sinks=2, recent=10, policy="h2o", chunk_size=16,
                                  cam_window=8, seed=3, group_reduce="max")
    assert s.cache().policy == "h2o"


@pytest.mark.parametrize("text, words", [
    ("policy=h2o", "budget is required"),
    ("budget=abc", "budget must be an integer"),
    ("budget=256,colour=red", "'colour=red'"),
    ("budget=256,policy", "'policy'"),
    ("budget=256,policy=full", "unset WEIGHTEDKV_VLLM"),
    ("budget=256,policy=nope", "policy"),
    ("budget=8,sinks=4,recent=4", "budget"),
])
def test_bad_values_name_the_key(text, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        settings.parse(text)


def test_from_env(monkeypatch):
    monkeypatch.delenv(settings.ENV, raising=False)
    assert settings.from_env() is None
    monkeypatch.setenv(settings.ENV, "  ")
    assert settings.from_env() is None
    monkeypatch.setenv(settings.ENV, "budget=100")
    assert settings.from_env().budget == 100


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="checks the environment without vLLM")
def test_register_without_env_needs_no_vllm(monkeypatch):
    """vLLM calls register() in every process: unset, it must do nothing (not even import vLLM)."""
    import weightedkv_ext.vllm as plugin

    monkeypatch.delenv(settings.ENV, raising=False)
    assert plugin.register() is None
