"""Proposal embeddings (METHOD.md steps 3 and 4): rotated crops, the frozen ResNet, their Parquet
artefacts, and the PCA + spherical k-means targets.

    rotated_crop   le90 boxes -> crops (affine_grid / grid_sample), the geometry; rotated RoI-align on feature maps
    backbone       weights resolution and the frozen ResNet-to-C5 embedder
    pipeline       tile decoding workers, batching of crops across tiles (or of whole tiles: mode pooled)
    artefacts      embeddings / targets schemas, save/load, the exact join to the proposals
    cluster        PCA + spherical k-means fit, persisted as plain arrays (npz)
"""
