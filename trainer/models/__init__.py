"""Encoders, projection heads, and the module an engine trains (model + objective parameters)."""
