"""The whole cir_plugins integration of the timm + BERT TIRG model: one wrap_model call (quoted in README.md)."""
import cir_plugins as cp
from examples.timm_tirg.model import TimmTIRG


def load(path: str):
    """Checkpoint directory written by TimmTIRG.save_pretrained -> a model that meets cir_plugins' protocol."""
    return cp.wrap_model(TimmTIRG.from_pretrained(path), encode_image="embed_image",
                         encode_reference="image_features", compose_query="compose")
