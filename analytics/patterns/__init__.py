"""Pattern atlas: attention maps as fixed-size images, their clusters, and per-head cluster profiles.

Method: Li et al., "Visual Analytics for Vision Transformers" (IEEE TVCG 2023; METHODS.md §3.2) train a
convolutional autoencoder on per-query-patch attention maps on the patch grid, project the codes to 2-D
and cluster them into pattern types; each head is summarised by its distribution over the clusters.
Here the same is done for text heads too, with an alignment of maps of any length (encode.py).

    captures ─▶ sample_maps ─▶ MapSet (32 x 32 images + traits) ─▶ autoencoder (probes.pattern_atlas,
    torch) ─▶ codes ─▶ embed_2d (UMAP) + cluster_codes (k-means / HDBSCAN) ─▶ cluster_labels ─▶ Atlas

This package is the numpy side, one module per step:
- encode.py     the text and image encodings of a map, and the traits measured on its rows;
- sample.py     MapSet: every head's maps of some captures (or loose / synthetic maps), with provenance;
- cluster.py    the 2-D embedding and the clusters of the latent codes;
- describe.py   cluster traits and labels, head profiles over the clusters;
- selection.py  a selection of maps: its heads and its value in a share link;
- atlas.py      Atlas and AtlasParams, and their parts as cache.atlas stores them.
Pure numpy (+ scikit-learn, umap-learn): no torch, no streamlit, no cache.
"""
from analytics.patterns.atlas import (Atlas, AtlasParams, atlas_from_store, atlas_to_store, model_from_store,
                                      model_to_store)
from analytics.patterns.cluster import (ClusterParams, Clustering, cluster_codes, embed_2d, majority, nearest_members,
                                        purity, standardise, warm_umap)
from analytics.patterns.describe import (cluster_labels, cluster_modalities, cluster_traits, describe, dominant,
                                         head_profiles, layer_composition, profile_shift)
from analytics.patterns.encode import (ENCODINGS, SELF_COLUMN, SIZE, TRAIT_TITLES, TRAITS, encode_text_map,
                                       encode_text_rows, encode_vision_rows, patch_span, query_lattice, text_queries,
                                       text_traits, vision_traits)
from analytics.patterns.sample import (SYNTHETIC_KINDS, MapSet, Source, maps_from_arrays, sample_capture, sample_maps,
                                       synthetic_map, synthetic_set)
from analytics.patterns.selection import parse_selection, selection_heads, selection_text

__all__ = ["Atlas", "AtlasParams", "ClusterParams", "Clustering", "ENCODINGS", "MapSet", "SELF_COLUMN", "SIZE",
           "SYNTHETIC_KINDS", "Source", "TRAITS", "TRAIT_TITLES", "atlas_from_store", "atlas_to_store", "cluster_codes",
           "cluster_labels", "cluster_modalities", "cluster_traits", "describe", "dominant", "embed_2d",
           "encode_text_map", "encode_text_rows", "encode_vision_rows", "head_profiles", "layer_composition",
           "majority", "maps_from_arrays", "model_from_store", "model_to_store", "nearest_members", "parse_selection",
           "patch_span", "profile_shift", "purity", "query_lattice", "sample_capture", "sample_maps", "selection_heads",
           "selection_text", "standardise", "synthetic_map", "synthetic_set", "text_queries", "text_traits",
           "vision_traits", "warm_umap"]
