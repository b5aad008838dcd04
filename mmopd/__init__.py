"""mmopd: on-policy distillation for language, vision-language and image-token models."""

from mmopd.config import Config, ConfigError, load_config
from mmopd.run.session import evaluate
from mmopd.run.trainer import train

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "load_config", "train", "evaluate", "__version__"]
