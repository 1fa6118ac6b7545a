"""Scaling positives: generated triplets (dedup -> pair -> caption -> template -> rewrite -> fit).

Modules: dedup (duplicate groups), captioners (HFCaptioner, PrecomputedCaptioner, caption cache),
pairing (rank-window partners, chunked), templates (modification texts, the text-length policy),
rewriters (LLMRewriter, the per-text hook adapter), augmenter
(TripletAugmenter), annotations (CIRR / FashionIQ writers and readers), command (`cir-plugins augment`).
"""
