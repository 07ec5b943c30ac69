"""Backbones: model code names logical axes only and knows nothing of meshes or losses."""
