"""The vlm modality: vision-language models (AutoModelForImageTextToText + AutoProcessor)."""
