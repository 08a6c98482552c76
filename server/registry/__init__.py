"""Loaded models and versions, and the atomic swap between them."""
