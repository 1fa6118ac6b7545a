"""Scaling positives: generated triplets (dedup -> pair -> caption -> template -> rewrite -> fit).

Modules: captioners (HFCaptioner, PrecomputedCaptioner, caption cache), pairing (rank-window partners), templates
(modification texts, the text-length policy), rewriters (LLMRewriter, the per-text hook adapter), augmenter
(TripletAugmenter), annotations (CIRR / FashionIQ writers and readers); duplicate groups: cir_plugins.data.dedup.
"""
