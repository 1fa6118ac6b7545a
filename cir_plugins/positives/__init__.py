"""Scaling positives: generated triplets (dedup -> pair -> caption -> template).

Modules: dedup (duplicate groups), captioners (HFCaptioner, PrecomputedCaptioner, caption cache),
pairing (rank-window partners, chunked), templates (modification texts), augmenter
(TripletAugmenter), annotations (CIRR / FashionIQ writers and readers), command (`cir-plugins augment`).
"""
