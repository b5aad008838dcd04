"""Autoregressive image generators over visual tokens: Janus and a built-in LlamaGen-style family."""
