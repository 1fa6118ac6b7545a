"""cir_plugins: scale the positives and negatives of any Composed Image Retrieval model.

Public names resolve lazily (PEP 562): a submodule is imported only when one of its names is first used.
"""

import importlib as _importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_WHERE = {
    "CIRModel": "protocol", "wrap_model": "protocol", "check_model": "protocol", "reference_input": "protocol",
    "Triplet": "data.triplet", "ImageStore": "data.images", "load_cirr": "data.cirr",
    "load_fashioniq": "data.fashioniq", "make_world": "data.synthetic",
    "TripletAugmenter": "positives.augmenter", "AugmentConfig": "positives.augmenter",
    "AugmentResult": "positives.augmenter", "LLMRewriter": "positives.rewriters",
    "NegativeBank": "negatives.bank", "bank_contrastive_loss": "negatives.loss",
    "Stage1Trainer": "training.stage1", "Stage2Trainer": "training.stage2", "Stage1Config": "training.config",
    "Stage2Config": "training.config", "Evaluator": "training.evaluator",
    "retrieval_metrics": "metrics", "evaluate": "evaluation", "write_cirr_submission": "submission",
    "load_trained": "trained", "save_trained": "share", "push_to_hub": "share", "load_recipe": "recipes",
    "reproduce": "recipes.run", "CIRPluginsError": "errors",
}

# the public contract: these names and nothing else (``__version__`` is an attribute, not a name to import)
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(_importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    return value


def __dir__() -> list[str]:
    """The public names (and the submodules already imported), not the module's own machinery."""
    return sorted({name for name in globals() if not name.startswith("_")} | set(__all__))
