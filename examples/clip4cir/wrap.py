"""The whole integration of CLIP4Cir with cir_plugins (quoted in the README).

CLIP4Cir already has ``encode_image`` / ``encode_reference`` / ``compose_query``, so wrapping only
says what stage 2 trains: the text tower (as the method's release does), plus the Combiner when
the model uses it.
"""
import cir_plugins as cp


def wrap(model, *, train_combiner=None):
    """CLIP4Cir -> a CIR-protocol model whose stage-2 trainable set is the text tower (+ Combiner)."""
    train_combiner = model.fusion == "combiner" if train_combiner is None else train_combiner
    trainable = model.text_tower_prefixes() + (["combiner"] if train_combiner else [])
    return cp.wrap_model(model, trainable=trainable, similarity="dot")
