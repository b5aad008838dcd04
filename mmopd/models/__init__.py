"""The models: the modality adapter's interface and its HF defaults (model calls), LoRA, FSDP2 sharding and the loop's
parallel strategy, checkpoints of the model and the trainer state, pretrained checkpoints, depth pruning and the
teacher/student compatibility check."""
