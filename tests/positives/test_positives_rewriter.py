"""cp.LLMRewriter on a tiny random causal LM built from a config and saved locally (no download).

A random model's text is noise: these tests check the machinery (shape, cache, fallback, determinism,
batching), never the quality of a rewrite."""

from __future__ import annotations

import json

import pytest
import torch

import cir_plugins as cp
from cir_plugins.errors import ConfigError, DataError, ModelProtocolError
from cir_plugins.positives.rewriters import (
    DEFAULT_EXAMPLES,
    LLMRewriter,
    TextHookRewriter,
    examples_from_triplets,
    unusable_reason,
)
from cir_plugins.positives.templates import TextMaker

WORDS = ("a an the of on in with and to make it more less red blue green black white dog cat car man woman shirt "
         "dress sleeves long short sitting running two one image reference target change instead unlike want show "
         "add remove bed chair park street : , .").split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}")
PAIRS = [("a red dog on a bed", "a blue cat on a chair"),
         ("a man running in a park", "two women sitting on a street with a black car and a white dog"),
         ("a long dress", "a short shirt with long sleeves"),
         ("a red dog on a bed", "a blue cat on a chair")]  # a repeat: one answer, cached once


def build_tiny_chat_model(folder, *, silent: bool = False, chat_template: bool = True):
    """A 2-layer Llama (hidden 32) and a word-level tokenizer with a chat template, saved in ``folder``.
    ``silent``: the final norm is zero, so every logit is 0 and greedy decoding picks id 0 (<pad>) forever:
    the model says nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = CHAT
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if silent:
        with torch.no_grad():
            model.model.norm.weight.zero_()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_chat_model(tmp_path_factory.mktemp("tiny-lm")))


@pytest.fixture(scope="module")
def silent(tmp_path_factory):
    return str(build_tiny_chat_model(tmp_path_factory.mktemp("silent-lm"), silent=True))


def templates_of(pairs):
    maker = TextMaker("cirr")
    return [maker.fill(r, t) for r, t in pairs]


def test_one_text_per_pair_and_counts(tiny):
    rewriter = LLMRewriter(tiny, max_new_tokens=6, max_words=6, batch_size=2)
    assert rewriter.name.startswith(f"hf-rewrite:{tiny}:")
    run = rewriter.rewrite_pairs(PAIRS, templates_of(PAIRS), show_progress=False)
    assert len(run.texts) == len(PAIRS)
    assert run.rewritten + run.fallback == len(PAIRS) and run.new == 3 and run.cached == 0
    assert run.model_calls == 2  # 3 distinct pairs in batches of 2
    for (reference, target), texts, filled in zip(PAIRS, run.texts, templates_of(PAIRS)):
        origins = [origin for origin, _ in texts]
        if origins == [f"rewrite:{rewriter.name}"]:  # the model's one text
            assert unusable_reason(texts[0][1], reference, target, 6) is None
        else:  # the templates, unchanged
            assert texts == filled
    print("tiny model's answer (noise, from random weights):", rewriter([PAIRS[0]])[0])


def test_cache_second_run_makes_no_model_call(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "rewrites.jsonl"
    first = LLMRewriter(tiny, max_new_tokens=6).rewrite_pairs(PAIRS, templates_of(PAIRS), cache_path=cache,
                                                               show_progress=False)
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(lines) == 3 and len({line["id"] for line in lines}) == 3
    again = LLMRewriter(tiny, max_new_tokens=6)

    def no_generate(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(again.model, "generate", no_generate)
    second = again.rewrite_pairs(PAIRS, templates_of(PAIRS), cache_path=cache, show_progress=False)
    assert second.texts == first.texts and second.model_calls == 0 and second.cached == 3 and second.new == 0
    # another prompt (other examples) is another key: the old answers are not reused
    other = LLMRewriter(tiny, max_new_tokens=6, examples=DEFAULT_EXAMPLES[:2])
    assert other.name != again.name and other.cache_key(*PAIRS[0]) != again.cache_key(*PAIRS[0])


def test_unusable_answer_falls_back_to_the_template_and_is_counted(silent, tmp_path):
    rewriter = LLMRewriter(silent, max_new_tokens=4)
    assert rewriter([PAIRS[0]]) == [""]  # the silent model says nothing
    run = rewriter.rewrite_pairs(PAIRS, templates_of(PAIRS), cache_path=tmp_path / "c.jsonl", show_progress=False)
    assert run.texts == templates_of(PAIRS)
    assert run.fallback == 4 and run.rewritten == 0 and run.reasons == {"empty": 4}
    # an empty answer is cached too: a deterministic model would say nothing again
    again = LLMRewriter(silent, max_new_tokens=4).rewrite_pairs(PAIRS, templates_of(PAIRS),
                                                                cache_path=tmp_path / "c.jsonl", show_progress=False)
    assert again.model_calls == 0 and again.reasons == {"empty": 4}


def test_unusable_reasons_and_long_output_policy(tiny, monkeypatch):
    r, t = "a red dog on a bed", "a blue cat on a chair"
    assert unusable_reason("  ...  ", r, t, 10) == "empty"
    assert unusable_reason("A blue cat on a chair.", r, t, 10) == "echo"
    assert unusable_reason("a red dog on a bed a blue cat on a chair", r, t, 20) == "echo"
    assert unusable_reason("Reference: a red dog", r, t, 10) == "prompt"
    assert unusable_reason("make the dog a blue cat and move it onto a chair", r, t, 5) == "too_long"
    assert unusable_reason("make the dog a blue cat on a chair", r, t, 10) is None
    long = "make the dog a blue cat and then put it on a chair by the window"
    for policy, expected in (("fallback", templates_of([(r, t)])[0]), ("cut", None)):
        rewriter = LLMRewriter(tiny, max_words=5, long_output=policy)
        monkeypatch.setattr(rewriter, "_generate", lambda pairs: [long] * len(pairs))
        run = rewriter.rewrite_pairs([(r, t)], templates_of([(r, t)]), show_progress=False)
        if expected is None:
            assert run.texts == [[(f"rewrite:{rewriter.name}", "make the dog a blue")]] and run.rewritten == 1
        else:
            assert run.texts == [expected] and run.reasons == {"too_long": 1}


def test_deterministic_and_batching_equals_one_by_one(tiny):
    pairs = PAIRS[:3]
    batched = LLMRewriter(tiny, max_new_tokens=8, batch_size=3)(pairs)
    again = LLMRewriter(tiny, max_new_tokens=8, batch_size=3)(pairs)
    one_by_one = LLMRewriter(tiny, max_new_tokens=8, batch_size=1)(pairs)
    assert batched == again == one_by_one
    assert len(set(batched)) > 1  # prompts of different lengths (left padding) gave their own answers


def test_prompt_holds_examples_and_captions(tiny):
    rewriter = LLMRewriter(tiny, examples=[("a red car", "a blue car", "make it blue")])
    messages = rewriter.messages_for("a dog", "a cat")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == "make it blue" and "a dog" in messages[-1]["content"]
    folded = LLMRewriter(tiny, system_message=False).messages_for("a dog", "a cat")
    assert folded[0]["role"] == "user" and "at most 20 words" in folded[0]["content"]
    assert rewriter.prompt_for("a dog", "a cat").endswith("<|assistant|> ")


def test_bad_settings_are_clear_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="max_words"):
        LLMRewriter(tiny, max_words=0)
    with pytest.raises(ConfigError, match="long_output"):
        LLMRewriter(tiny, long_output="drop")
    with pytest.raises(ConfigError, match="example #0"):
        LLMRewriter(tiny, examples=[("only two", "strings")])
    with pytest.raises(ModelProtocolError, match="no chat template"):
        LLMRewriter(str(build_tiny_chat_model(tmp_path / "plain", chat_template=False)))
    with pytest.raises(DataError, match="differ in length"):
        LLMRewriter(tiny).rewrite_pairs(PAIRS, [], show_progress=False)
    assert cp.LLMRewriter is LLMRewriter


def test_examples_from_triplets():
    triplets = [cp.Triplet("a", ["make it blue"], "b"), cp.Triplet("c", ["add a dog"], "d"),
                cp.Triplet("e", ["x"], "f")]
    captions = {"a": "a red car", "b": "a blue car", "c": "an empty park", "d": "a park with a dog", "e": "x"}
    examples = examples_from_triplets(triplets, captions, k=2)
    assert sorted(examples) == [("a red car", "a blue car", "make it blue"),
                                ("an empty park", "a park with a dog", "add a dog")]
    with pytest.raises(DataError, match="only 2 annotated"):
        examples_from_triplets(triplets, captions, k=3)


def test_per_text_hook_is_a_rewriter():
    hook = TextHookRewriter(str.upper)
    run = hook.rewrite_pairs(PAIRS[:1], templates_of(PAIRS[:1]))
    assert run.texts == [[(template, text.upper()) for template, text in templates_of(PAIRS[:1])[0]]]
    assert run.rewritten == 1 and run.fallback == 0
    same = TextHookRewriter(lambda text: text).rewrite_pairs(PAIRS[:1], templates_of(PAIRS[:1]))
    assert same.fallback == 1 and same.reasons == {"unchanged": 1}
    with pytest.raises(DataError, match="empty or non-string"):
        TextHookRewriter(lambda text: " ").rewrite_pairs(PAIRS[:1], templates_of(PAIRS[:1]))
    # TextMaker's rewrite= hook goes through the same adapter
    assert TextMaker("cirr", rewrite=str.upper)(*PAIRS[0]) == run.texts[0]
