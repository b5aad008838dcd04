"""The config keys the image_tokens modality owns: a guided teacher (`teacher.cfg_scale`) and the judge its
metric needs (`data.judge`), declared to the core's schema and checked here."""

from __future__ import annotations

from mmopd.config import Config, ConfigError, ModalityOptions, register_modality_options


def check_options(config: Config) -> None:
    """Evaluation and the judge reward judge pictures, so they need data.judge; classifier-free guidance needs
    cfg_scale >= 0."""
    if config.data.eval and not config.data.judge:
        raise ConfigError("image_tokens evaluation judges pictures with a classifier: set data.judge to its "
                          "directory (`mmopd toy image` writes one), or leave data.eval empty")
    if config.objective.reward == "judge" and not config.data.judge:
        raise ConfigError("objective.reward=judge grades each picture with a classifier: set data.judge to its "
                          "directory (`mmopd toy image` writes one)")
    if config.teacher.cfg_scale < 0:
        raise ConfigError(f"teacher.cfg_scale must be >= 0, got {config.teacher.cfg_scale}")


OPTIONS = ModalityOptions(guidance=True, check=check_options)
register_modality_options("image_tokens", OPTIONS)
