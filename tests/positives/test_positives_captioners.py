import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from cir_plugins.data.images import pil_loader
from cir_plugins.errors import AnnotationError, ConfigError, DataError, ModelProtocolError
from cir_plugins.positives.captioners import (
    CaptionCache,
    HFCaptioner,
    PrecomputedCaptioner,
    caption_images,
    clean_caption,
)

REPO = Path(__file__).resolve().parents[2]
WORDS = "please briefly describe the image in 10 words dress shirt toptee a red blue green cat dog on with".split()


def build_tiny_blip(path: Path) -> Path:
    """A randomly initialised BLIP captioner with a 60-word WordPiece tokenizer, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + WORDS + [f"w{i}" for i in range(40)]
    backend = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    backend.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 16, "width": 16}), tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=5, sep_token_id=3,
                         pad_token_id=0, eos_token_id=3),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("tiny_blip"))


def _images(n):
    return {f"im{k}": Image.new("RGB", (20 + k, 18), (37 * k % 256, 90, 255 - 11 * k % 256)) for k in range(n)}


def test_hf_captioner_runs_caches_and_second_run_captions_nothing(tiny_blip, tmp_path):
    images = _images(5)
    cache = tmp_path / "captions.jsonl"
    captioner = HFCaptioner(str(tiny_blip), max_new_tokens=5, batch_size=2)
    assert captioner.name.startswith("hf:") and not captioner.use_chat_template
    first = caption_images(captioner, list(images), images, cache_path=cache, batch_size=5, show_progress=False)
    assert first.new == 5 and first.cached == 0
    assert captioner.generate_calls == 3  # 5 images, model batch 2
    for caption in first.captions.values():
        assert caption.strip() and not caption.lower().startswith("please")  # prompt echo stripped
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [r["id"] for r in lines] == list(images) and {r["captioner"] for r in lines} == {captioner.name}
    second = caption_images(captioner, list(images), images, cache_path=cache, show_progress=False)
    assert captioner.generate_calls == 3 and second.new == 0 and second.cached == 5
    assert second.captions == first.captions
    fresh = HFCaptioner(str(tiny_blip), max_new_tokens=5, batch_size=5)  # greedy: same captions, other batching
    assert fresh(list(images), list(images.values())) == [first.captions[i] for i in images]


def test_hf_captioner_fashion_prompts_per_category_and_chat_template(tiny_blip):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    images = _images(4)
    cats = {"im0": "dress", "im1": "shirt", "im2": "dress", "im3": "toptee"}
    captioner = HFCaptioner(str(tiny_blip), domain="fashion", category=cats, k=7, max_new_tokens=3, batch_size=8)
    assert captioner.prompt_for("im1") == "please briefly describe the shirt in 7 words"
    captions = captioner(list(images), list(images.values()))
    assert len(captions) == 4 and captioner.generate_calls == 3  # one call per distinct prompt
    with pytest.raises(ConfigError):
        HFCaptioner(str(tiny_blip), domain="fashion")

    processor = AutoProcessor.from_pretrained(tiny_blip)
    processor.chat_template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'text' %}"
                               "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
    model = AutoModelForImageTextToText.from_pretrained(tiny_blip)
    chat = HFCaptioner(model, processor=processor, max_new_tokens=4)
    assert chat.use_chat_template and chat.name != HFCaptioner(str(tiny_blip), max_new_tokens=4).name
    for caption in chat(["im0", "im1"], [images["im0"], images["im1"]]):
        assert caption.strip() and "assistant" not in caption.lower() and "please" not in caption.lower()


def test_hf_captioner_empty_caption_is_error_or_counted_skip(tiny_blip):
    images = _images(2)
    only_specials = {"suppress_tokens": list(range(6, 6 + len(WORDS) + 40))}  # the model can emit nothing readable
    strict = HFCaptioner(str(tiny_blip), max_new_tokens=3, generate_kwargs=only_specials)
    with pytest.raises(DataError, match="im0"):
        strict(list(images), list(images.values()))
    lenient = HFCaptioner(str(tiny_blip), max_new_tokens=3, generate_kwargs=only_specials, skip_empty=True)
    run = caption_images(lenient, list(images), images, skip_empty=True, show_progress=False)
    assert lenient.skipped == 2 and run.skipped == ["im0", "im1"] and run.captions == {}


def test_clean_caption():
    assert clean_caption('  "a red dress."  ') == "a red dress"
    assert clean_caption("Please briefly  describe the image: a cat", "please briefly describe the image") == "a cat"
    assert clean_caption("USER : hi ASSISTANT : a dog", "USER: hi ASSISTANT:", "hi") == "a dog"
    assert clean_caption("a cat please", "please") == "a cat please"


def test_precomputed_captioner_json_and_jsonl(tmp_path):
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps({"a": "a cat", "b": "a dog"}))
    as_jsonl = tmp_path / "c.jsonl"
    as_jsonl.write_text('{"id": "a", "caption": "a cat"}\n\n{"id": "b", "caption": "a dog"}\n')
    for path in (as_json, as_jsonl):
        captioner = PrecomputedCaptioner(path)
        assert captioner(["b", "a"], [None, None]) == ["a dog", "a cat"]
        with pytest.raises(DataError, match="'zz'"):
            captioner(["a", "zz"], [None, None])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "caption": "x"}\nnot json\n')
    with pytest.raises(AnnotationError, match="bad.jsonl:2"):
        PrecomputedCaptioner(bad)
    with pytest.raises(ConfigError):
        PrecomputedCaptioner(tmp_path / "missing.json")


class Echo:
    name = "echo-v1"

    def __init__(self):
        self.seen = []

    def __call__(self, image_ids, images):
        self.seen.extend(image_ids)
        return [f"caption of {i} {img.size[0]}" for i, img in zip(image_ids, images)]


def test_cache_torn_line_other_captioner_and_malformed(tmp_path):
    images = _images(4)
    path = tmp_path / "cache.jsonl"
    caption_images(Echo(), ["im0", "im1"], images, cache_path=path, show_progress=False)
    with open(path, "ab") as handle:
        handle.write(b'{"id": "im2", "caption": "half')  # killed mid-write
    echo = Echo()
    run = caption_images(echo, list(images), images, cache_path=path, show_progress=False)
    assert run.torn_lines == 1 and echo.seen == ["im2", "im3"] and run.cached == 2
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in records] == ["im0", "im1", "im2", "im3"]
    assert CaptionCache(path, "echo-v1").torn_lines == 0

    class Other(Echo):
        name = "other"

    with pytest.raises(ConfigError, match="another captioner"):
        caption_images(Other(), ["im0"], images, cache_path=path, show_progress=False)
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n{broken\n" + lines[1] + "\n")
    with pytest.raises(AnnotationError, match=":2"):
        CaptionCache(path, "echo-v1")


def test_caption_images_validates_captioner_and_tensor_images():
    with pytest.raises(ModelProtocolError):
        caption_images(lambda ids, imgs: ["x"] * len(ids), ["a"], {"a": Image.new("RGB", (2, 2))}, show_progress=False)
    tensor = torch.rand(3, 5, 4)
    image = pil_loader({"t": tensor})("t")
    assert image.size == (4, 5) and image.mode == "RGB"

    class Bad:
        name = "bad"

        def __call__(self, ids, imgs):
            return ["", "fine"]

    with pytest.raises(DataError, match="'a'"):
        caption_images(Bad(), ["a", "b"], {"a": image, "b": image}, show_progress=False)


KILL_SCRIPT = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {repo!r})
    sys.path[:0] = [{tests!r}, {tests_root!r}]
    from test_positives_captioners import Slow, slow_images
    from cir_plugins.positives.captioners import caption_images

    images = slow_images()
    caption_images(Slow(float(sys.argv[2])), list(images), images, cache_path=sys.argv[1], batch_size=3,
                   show_progress=False)
''')


class Slow:
    name = "slow-v1"

    def __init__(self, pause=0.0):
        self.pause, self.calls = pause, 0

    def __call__(self, ids, images):
        time.sleep(self.pause)
        self.calls += 1
        return [f"caption of {i} {img.getpixel((0, 0))[0]}" for i, img in zip(ids, images)]


def slow_images():
    return {f"im{k}": Image.new("RGB", (2, 2), (k % 256, 0, 0)) for k in range(90)}


def test_kill_mid_run_then_rerun_matches_uninterrupted(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), tests=str(Path(__file__).parent),
                                         tests_root=str(Path(__file__).parents[1])))
    killed_cache = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), str(killed_cache), "0.05"])
    deadline = time.time() + 120
    while time.time() < deadline:
        if killed_cache.exists() and killed_cache.read_text().count("\n") >= 15:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = killed_cache.read_text().count("\n")
    assert 15 <= done_before < 90, "the run should have been killed half way"
    with open(killed_cache, "ab") as handle:  # as if the kill landed inside a write
        handle.write(b'{"id": "im89", "capt')
    images = slow_images()
    again = Slow()
    rerun = caption_images(again, list(images), images, cache_path=killed_cache, batch_size=3, show_progress=False)
    assert rerun.torn_lines == 1 and rerun.cached == done_before and rerun.new == 90 - done_before
    straight = caption_images(Slow(), list(images), images, cache_path=tmp_path / "straight.jsonl", batch_size=3,
                              show_progress=False)
    assert rerun.captions == straight.captions
    killed = [json.loads(line) for line in killed_cache.read_text().splitlines()]
    assert len({r["id"] for r in killed}) == len(killed) == 90  # no duplicates, nothing lost
    assert {r["id"]: r["caption"] for r in killed} == straight.captions
