"""Random-weight Qwen2.5-shaped causal LMs and prompt batches for the rollout and step benchmarks."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM  # imported now, not inside a measured section

from mmopd.models.adapter import ModalityAdapter
from mmopd.step.batch import PromptBatch

# (hidden, layers, heads, kv heads, intermediate, vocab, tied head) of the real checkpoints
QWEN25 = {
    "0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "1.5b": (1536, 28, 12, 2, 8960, 151936, True),
    "7b": (3584, 28, 28, 4, 18944, 152064, False),
}


def shape_of(text: str) -> tuple:
    """'0.5b' (a Qwen2.5 size) or 'H,layers,heads,kv_heads,intermediate,vocab' (a tied head)."""
    if text in QWEN25:
        return QWEN25[text]
    hidden, layers, heads, kv, inter, vocab = (int(x) for x in text.split(","))
    return hidden, layers, heads, kv, inter, vocab, True


def random_qwen2(text: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Qwen2ForCausalLM:
    """A Qwen2ForCausalLM of the given shape with random weights (no download)."""
    hidden, layers, heads, kv, inter, vocab, tied = shape_of(text)
    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                                      tie_word_embeddings=tied, max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype)


class RandomPrompts(ModalityAdapter):
    """Records {"ids": [...]} are already token ids; prompts are left-padded (lengths differ)."""

    name = "random_prompts"

    def encode_prompts(self, records: list[dict], processor: object) -> PromptBatch:
        P = max(len(r["ids"]) for r in records)
        ids = torch.zeros(len(records), P, dtype=torch.long)
        mask = torch.zeros(len(records), P, dtype=torch.long)
        for i, r in enumerate(records):
            ids[i, P - len(r["ids"]):] = torch.tensor(r["ids"])
            mask[i, P - len(r["ids"]):] = 1
        return PromptBatch(ids, mask)


def random_records(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """`batch` prompts of random ids, lengths spread over [prompt_len/2, prompt_len]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (batch,), generator=g)
    return [{"ids": torch.randint(1, vocab, (int(n),), generator=g).tolist()} for n in lengths]
