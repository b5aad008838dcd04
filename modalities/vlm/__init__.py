"""The vlm modality: vision-language models (AutoModelForImageTextToText + AutoProcessor)."""

from mmopd.config import ModalityOptions, register_modality_options

# student.trainable: lm_only freezes the vision tower and projector (VLMAdapter.prepare_trainable)
register_modality_options("vlm", ModalityOptions(trainable=("lm_only",)))
