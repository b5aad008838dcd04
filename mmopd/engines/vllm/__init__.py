"""vLLM engines: the student samples with a real inference engine, colocated or served, and gets the trainer's
weights after every optimizer step; a vLLM teacher, colocated or served, scores the responses.

One module a job:
- `transport`: what an engine asks of its transport (`Transport`, `Scoring`) and `EngineError`;
- `served`: the HTTP transport to a `vllm serve` (`rollout.url` / `teacher.url`);
- `colocated`: the in-process transport, a `vllm.LLM` in the trainer's process (the only module that imports vLLM);
- `checkpoint`: the engine checkpoint writer (untied head, vLLM's key layout);
- `rollout`: the rollout engine (`VLLMRollout`) and its weight sync;
- `teacher`: the teacher scorer (`VLLMTeacher`);
- `head`: the teacher's LM head read from its checkpoint, for a served teacher that sends its last hidden states;
- `serve`: the `vllm serve` command a config needs (`mmopd serve teacher|rollout CONFIG`).
"""

from mmopd.engines.vllm.checkpoint import UNTIED_HEAD_FILE, ties_head, write_engine_checkpoint
from mmopd.engines.vllm.colocated import VLLM_LORA_RANKS, Colocated
from mmopd.engines.vllm.head import TeacherHead, load_head
from mmopd.engines.vllm.rollout import VLLMRollout, default_sync_dir, remove_sync_dir
from mmopd.engines.vllm.served import POOLING_ARGS, POOLING_CONFIG, Served, data_uri
from mmopd.engines.vllm.teacher import VLLMTeacher
from mmopd.engines.vllm.transport import Completion, EngineError, Entries, Scoring, Transport

__all__ = ["POOLING_ARGS", "POOLING_CONFIG", "UNTIED_HEAD_FILE", "VLLM_LORA_RANKS", "Colocated", "Completion",
           "EngineError", "Entries", "Scoring", "Served", "TeacherHead", "Transport", "VLLMRollout", "VLLMTeacher",
           "data_uri", "default_sync_dir", "load_head", "remove_sync_dir", "ties_head", "write_engine_checkpoint"]
