"""Edge maps for the ControlNet: the offline soft extractor and the HED network (issue #15, docs/edges.md)."""

from .extract import EDGE_METHODS, edges_to_image, extract_edges, image_to_unit
from .hed import DEFAULT_HED_WEIGHTS, hed_edges, load_hed, resolve_hed_weights, safe_step
from .soft import soft_edges

__all__ = [
    "DEFAULT_HED_WEIGHTS",
    "EDGE_METHODS",
    "edges_to_image",
    "extract_edges",
    "hed_edges",
    "image_to_unit",
    "load_hed",
    "resolve_hed_weights",
    "safe_step",
    "soft_edges",
]
