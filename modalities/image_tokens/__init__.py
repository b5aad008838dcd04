"""Autoregressive image generators over visual tokens: Janus and a built-in LlamaGen-style family."""

from modalities.image_tokens import options  # noqa: F401  (registers the modality's config options)
