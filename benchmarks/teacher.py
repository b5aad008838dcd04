"""Teacher scoring throughput and bytes on the wire: the in-process hf teacher against a served vLLM teacher
(`teacher.engine=vllm`) on the same model and the same fixed batch, in one run, for the three things a served
teacher can send: its token log-probs, its top k (+ the tail class), and its last hidden states (the exact full
distribution, through the LM head the trainer holds).

    MMOPD_VLLM_PYTHON=/path/to/.venv-vllm/bin/python python -m benchmarks.teacher [--batch 16] [--prompt-len 32]
        [--response-len 64] [--top-k 8] [--reps 3] [--model DIR] [--device cuda --dtype bfloat16]

A random Qwen3 (head_dim 32, which vLLM's CPU attention supports; 256 hidden, 4 layers, vocab 8192) is saved
with the text toy's tokenizer; the ids sent stay inside that tokenizer. The script starts `vllm serve` on it
(float32, eager) twice, as a generating server and as a pooling one (POOLING_ARGS), scores the batch's response
tokens through HFTeacher and VLLMTeacher (token log-probs, the top-k + tail form, and the full distribution from
hidden states), and prints tokens/s (batch × response length / median seconds), served / hf, and the bytes of
the JSON answers a response token costs. At a larger model's hidden size H (`--wire-hidden 3584`, Qwen2.5-7B's) the
hidden states' bytes are scaled by H (base64 of float32: 4·H·4/3 bytes a position); the other two forms do not
depend on the model's size.
`--model DIR` scores with a checkpoint of your own instead (its ids drawn below the toy tokenizer's size), and
`--device cuda --dtype bfloat16` runs both on a GPU (`benchmarks/gpu/teacher.sh`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from mmopd.engines import DISTRIBUTION, TOKEN_LOGPROBS, TOP_K, HFTeacher, TeacherNeed, VLLMTeacher
from mmopd.engines.vllm import Served, load_head
from mmopd.engines.vllm.served import POOLING_ARGS
from mmopd.models.adapter import get_adapter
from mmopd.step.batch import PromptBatch, TokenSpace
from modalities.text import toy
from tests.vllm_server import start_server


def build(out: Path) -> Path:
    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer()
    config = transformers.Qwen3Config(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=4, head_dim=32, intermediate_size=1024,
                                      max_position_embeddings=512, tie_word_embeddings=False,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    transformers.Qwen3ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def wire_bytes_per_token(transport: Served, fn, tokens: int) -> float:
    """The bytes of the answers' bodies (`Served.received`) of one call of `fn`, a response token."""
    transport.received = 0
    fn()
    return transport.received / tokens


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", help="a causal LM checkpoint to score with (default: a random Qwen3 built here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--wire-hidden", type=int, default=3584,
                        help="also give the hidden states' bytes a token at this hidden size (Qwen2.5-7B's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="mmopd-bench-teacher-"))
    path = Path(args.model) if args.model else build(root / "teacher")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    adapter = get_adapter("text")
    vocab = len(toy.build_tokenizer())
    g = torch.Generator().manual_seed(0)
    eos = toy.build_tokenizer().eos_token_id
    prompt_ids = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g)
    prompt_ids[prompt_ids == eos] = 0
    tokens = torch.randint(0, vocab, (args.batch, args.response_len), generator=g)  # [B, T]
    tokens[tokens == eos] = 0  # every row scores all T tokens
    prompt_ids, tokens = prompt_ids.to(args.device), tokens.to(args.device)
    prompts = PromptBatch(prompt_ids, torch.ones_like(prompt_ids))
    space = TokenSpace(model.config.vocab_size)
    gpu_share = ("--gpu-memory-utilization", "0.4") if args.device == "cuda" else ()  # the hf teacher needs the rest
    common = ("--max-model-len", "512", "--dtype", args.dtype, *gpu_share)
    n = args.batch * args.response_len
    rows = {}
    needs = {"token_logprobs": TeacherNeed(TOKEN_LOGPROBS), "top_k": TeacherNeed(TOP_K, k=args.top_k),
             "hidden_states": TeacherNeed(DISTRIBUTION)}
    for server_args, names in (((("--max-logprobs", str(args.top_k)), ("token_logprobs", "top_k")),
                               ((*POOLING_ARGS,), ("hidden_states",)))):
        server = start_server(path, extra_args=(*server_args, *common))
        try:
            transport = Served(server.url, 120.0, 0, role="teacher")
            head = load_head(str(path), model, model.dtype) if "hidden_states" in names else None
            served = VLLMTeacher(transport, space, [eos], head, fused=True)
            for name in names:
                need, ours = needs[name], HFTeacher(adapter, model, space, fused=name == "hidden_states")
                hf_s = median_seconds(lambda: ours.score(prompts, tokens, need), args.reps)
                vllm_s = median_seconds(lambda: served.score(prompts, tokens, need), args.reps)
                wire = wire_bytes_per_token(transport, lambda: served.score(prompts, tokens, need), n)
                rows[name] = {"hf_tokens_per_s": n / hf_s, "vllm_tokens_per_s": n / vllm_s,
                              "vllm_over_hf": hf_s / vllm_s, "bytes_per_token": wire}
        finally:
            server.stop()
    hidden = model.config.hidden_size
    rows["hidden_states"][f"bytes_per_token_at_H{args.wire_hidden}"] = \
        rows["hidden_states"]["bytes_per_token"] * args.wire_hidden / hidden
    print(json.dumps({"batch": args.batch, "prompt_len": args.prompt_len, "response_len": args.response_len,
                      "k": args.top_k, "hidden_size": model.config.hidden_size,
                      "vocab": model.config.vocab_size, "threads": args.threads, "device": args.device, "dtype": args.dtype,
                      **rows}, indent=2))


if __name__ == "__main__":
    main()
