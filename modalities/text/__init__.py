"""The text modality: causal language models."""
