"""mmopd: on-policy distillation for language, vision-language and image-token models."""

from mmopd.config import Config, ConfigError, load_config

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "load_config", "train", "evaluate", "__version__"]


def train(config: Config) -> dict:
    """Run distillation as configured and return the summary."""
    from mmopd.trainer import train as _train

    return _train(config)


def evaluate(config: Config, checkpoint: str | None = None, which: str = "student") -> dict:
    """Evaluate the student, the teacher or a checkpoint on the eval split."""
    from mmopd.evaluation import evaluate as _evaluate

    return _evaluate(config, checkpoint, which)
