"""Datasets, label mappings, manifests and transforms."""
