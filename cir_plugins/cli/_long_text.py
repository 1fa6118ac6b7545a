"""``--long-text``: what the training commands do with a generated text the CIR model's tokenizer cannot take.

The method's release replaces such a text with the target caption alone ("target", the default); "truncate"
keeps its leading words that fit; "keep" leaves it to the model's tokenizer, which cuts it at its limit (the
cut can fall inside the target's description, "Unlike {R}, I want {T}"). The limit and the token count come
from the model (:func:`cir_plugins.positives.templates.text_limit_of`); annotated texts are never changed.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

__all__ = ["LONG_TEXT", "add_long_text_argument", "fit_generated"]

logger = logging.getLogger(__name__)

LONG_TEXT = ("target", "truncate", "keep")


def add_long_text_argument(parser: argparse.ArgumentParser) -> None:
    """``--long-text target|truncate|keep`` for the training commands."""
    parser.add_argument("--long-text", default="target", choices=LONG_TEXT,
                        help="a generated text longer than the model's tokenizer limit: 'target' = replaced by the "
                             "target caption alone, as the release does (default), 'truncate' = its leading words "
                             "that fit, 'keep' = cut by the tokenizer")


def fit_generated(args: argparse.Namespace, model: Any, triplets: list) -> list:
    """``triplets`` with the generated texts over the model's limit handled by ``--long-text``; prints the count."""
    from ..positives.templates import fit_generated_texts, text_limit_of

    policy = getattr(args, "long_text", "target")
    if policy == "keep" or not any(t.source == "generated" for t in triplets):
        return triplets
    limit = text_limit_of(model)
    if not limit:
        logger.info("the model exposes no tokenizer limit (max_text_tokens / count_text_tokens, or a tokenizer with "
                    "max_length): generated texts are used as they are")
        return triplets
    fitted, counts = fit_generated_texts(triplets, fallback=policy, **limit)
    what = "replaced by the target caption" if policy == "target" else "truncated"
    print(f"generated texts over the model's {limit['max_tokens']}-token limit: {counts['fallbacks']} of "
          f"{counts['texts']} {what}"
          + (f"; {counts['no_caption']} without a target caption kept as they are" if counts["no_caption"] else ""))
    return fitted
