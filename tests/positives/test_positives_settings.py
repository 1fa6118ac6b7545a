"""The positives' integer settings share one check (cir_plugins.checks.check_positive_ints): a bool, 0 or a
non-int is a ConfigError naming the setting."""

from __future__ import annotations

import pytest

from cir_plugins.checks import check_positive_ints
from cir_plugins.errors import ConfigError
from cir_plugins.positives.augmenter import AugmentConfig


@pytest.mark.parametrize("bad", [0, -2, True, 1.5, "4", None])
def test_check_positive_ints_names_the_first_bad_value(bad):
    check_positive_ints(a=1, b=7)
    with pytest.raises(ConfigError, match="b must be an int >= 1"):
        check_positive_ints(a=1, b=bad, c=0)


@pytest.mark.parametrize("setting", ["partners_per_image", "batch_size", "caption_batch_size", "chunk_size"])
def test_the_augmenter_config_refuses_a_setting_below_one(setting):
    with pytest.raises(ConfigError, match=f"{setting} must be an int >= 1"):
        AugmentConfig(**{setting: 0})


def test_a_loaded_model_without_its_tokenizer_or_processor_is_a_clear_error():
    """HFCaptioner and LLMRewriter load (or take) their model through one function, captioners.load_pretrained."""
    import torch

    from cir_plugins.positives.captioners import HFCaptioner, load_pretrained
    from cir_plugins.positives.rewriters import LLMRewriter

    with pytest.raises(ConfigError, match="needs its processor"):
        HFCaptioner(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="needs its tokenizer"):
        LLMRewriter(torch.nn.Linear(2, 2))
    model, companion, source = load_pretrained(torch.nn.Linear(2, 2), "tok", model_class="AutoModel",
                                               companion_class="AutoTokenizer", companion_name="tokenizer",
                                               dtype="bfloat16")
    assert model.weight.dtype == torch.bfloat16 and companion == "tok" and source == "Linear"
