"""The whole cir_plugins integration of the SPRC model: one wrap_model call (quoted in README.md)."""
import cir_plugins as cp
from examples.blip2_sprc.model import SPRCRetriever


def load(path: str = "Salesforce/blip2-itm-vit-g"):
    """Hub name or local checkpoint directory -> a model that meets cir_plugins' protocol."""
    return cp.wrap_model(SPRCRetriever.from_pretrained(path), encode_image="image_tokens",
                         encode_reference="fusion_prompt", compose_query="compose", similarity="max_token")
