"""The toy CIR model and world of the tests (and their subprocesses); conftest.py serves them as fixtures.

The world: N random images (3, 4, 4); K modifier words, each with a hidden shift in pixel space.
A triplet's target is the image nearest to reference + shift(word). The toy model embeds images
linearly (target side), the text with an EmbeddingBag, and fuses by sum + a linear layer (query
side), so the query side can learn the shifts exactly.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from torch import nn

from cir_plugins.data.triplet import Triplet


def factory_source(*setup: str) -> str:
    """The text of a factory file for the commands' ``--model FILE:build`` (or ``module:build``): ``build(seed=0)``
    returns the toy model, after running each ``setup`` statement with ``model`` in scope."""
    body = [f"    {line}" for line in setup]
    return "\n".join([f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})",
                      "from _toy import make_model", "", "", "def build(seed=0):", "    model = make_model(seed=seed)",
                      *body, "    return model", ""])


def pair_encoder_source(dim: int = 8) -> str:
    """The text of a pair-encoder factory file (``--pair-encoder enc.py:build``): pixels pooled 2 x 2, ``dim``
    values per image."""
    return (f"import torch\n\n\ndef build(dim={dim}):\n    def encode(images):  # (n, C, H, W) -> (n, dim)\n"
            "        return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)[:, :dim]\n"
            "    return encode\n")


WORDS = ["red", "blue", "big", "small", "round", "square", "bright", "dark", "left", "right", "tall"]


def tokens(text: str, vocab: int) -> list[int]:
    return [zlib.crc32(word.encode()) % vocab for word in text.split()] or [0]


class ToyCIR(nn.Module):
    """encode_image / encode_reference: Linear(48 -> D) (+ tokens for multi-vector);
    compose_query: reference + Linear(EmbeddingBag(text))."""

    def __init__(self, dim: int = 16, vocab: int = 97, tokens_per_image: int = 0, use_reference: bool = True,
                 seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.tokens_per_image = tokens_per_image
        self.use_reference = use_reference
        self.similarity = "max_token" if tokens_per_image else "dot"
        out = dim * tokens_per_image if tokens_per_image else dim
        self.image_proj = nn.Linear(48, out)
        self.ref_proj = nn.Linear(48, dim)
        self.text = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.fuse = nn.Linear(dim, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
            if not tokens_per_image:
                self.ref_proj.weight.copy_(self.image_proj.weight)
                self.ref_proj.bias.copy_(self.image_proj.bias)
        self.dim = dim

    def encode_image(self, images):
        x = self.image_proj(images.flatten(1))  # (N, D) or (N, T*D)
        if self.tokens_per_image:
            x = x.reshape(x.shape[0], self.tokens_per_image, self.dim)  # (N, T, D)
        return x

    def _reference(self, images):
        return self.ref_proj(images.flatten(1))  # (B, D)

    def compose_query(self, reference, texts):
        if not self.use_reference:
            reference = self._reference(reference)  # images given: run the reference tower here
        ids = [tokens(t, self.vocab) for t in texts]
        flat = torch.tensor([i for row in ids for i in row], device=reference.device)
        offsets = torch.tensor([0] + [len(r) for r in ids[:-1]], device=reference.device).cumsum(0)
        return reference + self.fuse(self.text(flat, offsets))  # (B, D)



class ToyCIRWithReference(ToyCIR):
    def encode_reference(self, images):
        return self._reference(images)


def make_model(**kwargs) -> ToyCIR:
    if kwargs.get("use_reference", True):
        return ToyCIRWithReference(**kwargs)
    return ToyCIR(**kwargs)


def make_world(n_images: int = 61, n_train: int = 120, n_val: int = 40, seed: int = 0, generated: int = 0):
    """Returns (images: dict id -> (3, 4, 4), train triplets, val triplets)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n_images, 48, generator=generator)
    shifts = torch.randn(len(WORDS), 48, generator=generator) * 1.5
    images = {f"img{i:03d}": pixels[i].reshape(3, 4, 4).clone() for i in range(n_images)}
    ids = list(images)

    def triplet(ref: int, word: int, source: str = "annotated") -> Triplet:
        wanted = pixels[ref] + shifts[word]
        distance = (pixels - wanted).norm(dim=1)
        distance[ref] = float("inf")
        target = int(distance.argmin())
        texts = (WORDS[word],) if source == "annotated" else (WORDS[word], f"make it {WORDS[word]}")
        return Triplet(ids[ref], texts, ids[target], source=source)

    train_refs = n_images * 2 // 3
    train = [triplet(int(torch.randint(train_refs, (1,), generator=generator)),
                     int(torch.randint(len(WORDS), (1,), generator=generator))) for _ in range(n_train)]
    train += [triplet(int(torch.randint(train_refs, (1,), generator=generator)),
                      int(torch.randint(len(WORDS), (1,), generator=generator)), "generated")
              for _ in range(generated)]
    val = [triplet(int(torch.randint(train_refs, n_images, (1,), generator=generator)),
                   int(torch.randint(len(WORDS), (1,), generator=generator))) for _ in range(n_val)]
    return images, train, val


def recall_at(model, bank, triplets, images, k: int = 1) -> float:
    """Plain reference recall@k (percent) against the bank, reference row masked."""
    import torch.nn.functional as F

    from cir_plugins.protocol import reference_input

    model.eval()
    with torch.no_grad():
        refs = torch.stack([images[t.reference] for t in triplets])
        q = F.normalize(model.compose_query(reference_input(model, refs), [t.texts[0] for t in triplets]), dim=-1)
        emb = bank.embeddings.float()
        scores = q @ emb.T if emb.dim() == 2 else torch.einsum("bd,ntd->bnt", q, emb).amax(-1)
        for i, t in enumerate(triplets):
            r, g = bank.row_of(t.reference), bank.row_of(t.target)
            if r != g:
                scores[i, r] = float("-inf")
        target = bank.rows_of([t.target for t in triplets])
        rank = (scores > scores.gather(1, target[:, None])).sum(1)
    return float((rank < k).float().mean() * 100)
