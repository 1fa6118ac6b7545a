import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cir_plugins.errors import ConfigError, DataError
from cir_plugins.positives.templates import PRESETS, TextMaker, fill_template, resolve_templates

captions = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())


def test_presets_are_the_papers():
    assert resolve_templates("cirr") == ("{target} instead of {reference}", "Unlike {reference}, I want {target}")
    assert resolve_templates("fashioniq") == ("{target}",)
    assert resolve_templates("all") == PRESETS["cirr"] + PRESETS["fashioniq"]
    assert resolve_templates(["fashioniq", "show {target}", "{target}"]) == ("{target}", "show {target}")
    assert fill_template("Unlike {reference}, I want {target}", "a red dress", "a blue dress") == \
        "Unlike a red dress, I want a blue dress"


@settings(max_examples=200, deadline=None)
@given(reference=captions, target=captions)
def test_filler_keeps_captions_verbatim_braces_and_unicode(reference, target):
    texts = dict(TextMaker("all")(reference, target))
    r, t = reference.strip(), target.strip()
    assert texts["{target} instead of {reference}"] == f"{t} instead of {r}"
    assert texts["{target}"] == t
    for text in texts.values():
        assert t in text


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=30))
def test_user_templates_validate_placeholders(text):
    if any(c in text for c in "{}"):
        try:
            resolve_templates(text + " {target}")
        except ConfigError:
            pass  # unbalanced or unknown placeholders are ConfigErrors, never anything else
    else:
        template = f"{text} -> {{target}} / {{reference}}"
        assert resolve_templates(template) == (template,)
        assert fill_template(template, "R{0}", "T{x}") == f"{text} -> T{{x}} / R{{0}}"


@pytest.mark.parametrize("bad", ["{target} and {colour}", "{target!r}", "{target:>10}", "{0}", "{target", "no slots",
                                 "", "   "])
def test_bad_templates_are_config_errors(bad):
    with pytest.raises(ConfigError):
        resolve_templates([bad])


@settings(max_examples=50, deadline=None)
@given(empty=st.sampled_from(["", " ", "\n\t", None, 3]), good=captions)
def test_empty_captions_are_errors(empty, good):
    with pytest.raises(DataError):
        TextMaker("cirr")(empty, good)
    with pytest.raises(DataError):
        fill_template("{target}", good, empty)


def test_length_policies():
    long_r = "a very long reference caption with many words in it"
    maker = TextMaker("cirr", max_tokens=6, fallback="target")
    assert maker(long_r, "short target") == [("{target} instead of {reference}", "short target")]
    assert maker.fallbacks_used == 2
    cut = TextMaker(["{target} instead of {reference}"], max_tokens=4, fallback="truncate")
    assert cut("one two three", "four five") == [("{target} instead of {reference}", "four five instead of")]
    with pytest.raises(DataError):
        TextMaker("cirr", max_tokens=3, fallback="error")("one two", "three four")
    chars = TextMaker("fashioniq", max_tokens=5, count_tokens=len, fallback="target")
    assert chars("r", "abcdefgh") == [("{target}", "abcde")]
    assert chars("r", "ab cd efgh")[0][1] == "ab cd"

    class Tok:
        def encode(self, text):
            return [0] + text.split() + [1]  # two special tokens

    tok = TextMaker("fashioniq", max_tokens=3, count_tokens=Tok(), fallback="truncate")
    assert tok("r", "x y z")[0][1] == "x"
    with pytest.raises(ConfigError):
        TextMaker("cirr", fallback="drop")
    with pytest.raises(ConfigError):
        TextMaker("cirr", max_tokens=0)


def test_rewrite_hook():
    maker = TextMaker("cirr", rewrite=lambda text: text.upper())
    assert [t for _, t in maker("cat", "dog")] == ["DOG INSTEAD OF CAT", "UNLIKE CAT, I WANT DOG"]
    with pytest.raises(DataError):
        TextMaker("cirr", rewrite=lambda text: "  ")("cat", "dog")


def test_fallback_warns_once_and_counts(caplog):
    import logging

    maker = TextMaker("fashioniq", max_tokens=2, fallback="truncate")
    with caplog.at_level(logging.WARNING, logger="cir_plugins.positives.templates"):
        for k in range(3):
            maker("r", f"one two three {k}")
    assert maker.fallbacks_used == 3
    assert len([r for r in caplog.records if "max_tokens=2" in r.getMessage()]) == 1
