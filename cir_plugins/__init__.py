"""cir_plugins: scale the positives and negatives of any Composed Image Retrieval model.

Public names resolve lazily (PEP 562), so ``import cir_plugins`` stays cheap and a submodule is
imported only when one of its names is first used.
"""

import importlib as _importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_WHERE = {
    "AugmentResult": "positives.augmenter",
    "BankMismatchError": "errors",
    "CIRModel": "protocol",
    "CIRPluginsError": "errors",
    "Evaluator": "training.evaluator",
    "ImageStore": "data.images",
    "LLMRewriter": "positives.rewriters",
    "NegativeBank": "negatives.bank",
    "Recipe": "recipes",
    "Stage1Config": "training.config",
    "Stage1Trainer": "training.stage1",
    "Stage2Config": "training.config",
    "Stage2Trainer": "training.stage2",
    "SyntheticCaptioner": "data.synthetic",
    "SyntheticRewriter": "data.synthetic",
    "Split": "data.split",
    "Triplet": "data.triplet",
    "TripletAugmenter": "positives.augmenter",
    "bank_contrastive_loss": "negatives.loss",
    "check_model": "protocol",
    "evaluate": "evaluation",
    "load_cirr": "data.cirr",
    "load_fashioniq": "data.fashioniq",
    "load_recipe": "recipes",
    "load_split": "data.fashioniq",
    "load_trained": "trained",
    "make_world": "data.synthetic",
    "push_to_hub": "share",
    "rank_cirr": "evaluation",
    "reference_input": "protocol",
    "reproduce": "recipes.run",
    "retrieval_metrics": "metrics",
    "save_trained": "share",
    "submit_cirr": "evaluation",
    "wrap_model": "protocol",
    "write_cirr_submission": "evaluation",
}

__all__ = sorted(["__version__", *_WHERE])


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(_importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (and the submodules already imported), not the module's own machinery."""
    return sorted({name for name in globals() if not name.startswith("_")} | set(__all__))
