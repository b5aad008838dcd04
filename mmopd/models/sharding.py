"""Sharded models with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`), for `train.sharding: fsdp` and
`teacher.sharding: fsdp`.

Each decoder layer (the classes a model names in `_no_split_modules`) becomes one FSDP unit, then the root
holds what is left (embeddings, final norm, LM head). Every rank keeps 1/world of each parameter as a DTensor
shard and all-gathers a unit's full weights only around its forward (and backward). The optimizer, built over
the sharded parameters, keeps sharded state.

What sharding asks of the rest of the code, all of it here:
- every rank takes part in every forward, so a decode loop stops only when no rank has a live row
  (`any_rank`), and evaluation runs on every rank;
- the root's weights stay gathered after a forward (FSDP2 keeps them for the backward that usually follows);
  a frozen teacher has no backward, so `reshard` frees them after each step;
- gradients reduce on every backward unless `gradient_sync(model, False)` says otherwise;
- the gradient norm is a DTensor reduced over ranks (`clip_grad_norm`);
- saves gather the full state dict onto rank 0 (`full_state_dict`) and write the optimizer's shards with
  `torch.distributed.checkpoint` (`save_optimizer`, `load_optimizer`).

The trainer sees none of it: `parallel` picks, once, how the student trains over the processes, `Replicated`
(one process, or DDP through accelerate) or `Sharded` (FSDP2), and the loop calls the same methods on either:
`accumulating`, `backward`, `clip`, `save`, `load_optimizer`.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from mmopd.models.checkpoint import checkpoint_dir, commit_checkpoint, save_checkpoint
from mmopd.models.lora import is_lora, merged_weights


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, outermost first: modules whose class `_no_split_modules` names, or else the
    children of its longest nn.ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if type(module).__name__ in names and id(module) not in inside:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} names no _no_split_modules and holds no nn.ModuleList of layers "
                         "to shard; set train.sharding=none and teacher.sharding=none")
    return list(max(lists, key=len))


def shard(model: nn.Module, device: torch.device, trainable: bool, cpu_offload: bool = False) -> nn.Module:
    """Shard `model` in place over every process (one unit per decoder layer, then the root) and return it.
    On a GPU the weights are gathered in bf16 and gradients reduced in fp32."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options: dict = {"mesh": mesh}  # layers reshard after forward; the root keeps its weights for the LM head
    if device.type == "cuda" and trainable:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def is_sharded(model: nn.Module | None) -> bool:
    return isinstance(model, FSDPModule)


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the full parameters)."""
    local = full = 0
    for p in model.parameters():
        shard_ = p.to_local() if isinstance(p, DTensor) else p
        local += shard_.numel() * shard_.element_size()
        full += p.numel() * p.element_size()
    return local, full


def same_parameter(a: Tensor, b: Tensor) -> bool:
    """Whether two parameters are one (a tied LM head): the same object, or plain tensors on the same storage."""
    return a is b or not isinstance(a, DTensor) and not isinstance(b, DTensor) and a.data_ptr() == b.data_ptr()


def reshard(model: nn.Module | None) -> None:
    """Free the gathered root weights a forward left behind (a frozen teacher has no backward that would)."""
    if is_sharded(model):
        model.reshard()


def any_rank(flag: Tensor, model: nn.Module) -> bool:
    """Whether any element of the bool tensor `flag` is true on any rank (just this rank's, unsharded)."""
    anywhere = flag.any()
    if is_sharded(model):
        anywhere = anywhere.to(torch.int32)
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
    return bool(anywhere)


@contextmanager
def gradient_sync(model: nn.Module, on: bool) -> Iterator[None]:
    """Reduce gradients across ranks on this backward only if `on` (off: they accumulate locally)."""
    model.set_requires_gradient_sync(on)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """The global L2 norm of the sharded gradients (over every rank's shards); clipped to `max_norm` if > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full, unsharded state dict on CPU on rank 0 (an empty dict on the others). Every rank must call it.
    This is what a rollout engine that holds full weights (vLLM) loads at sync, and what checkpoints save."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every rank writes its optimizer shards into the directory `path` (DCP; collective)."""
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path))


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load what `save_optimizer` wrote, resharded to this run's layout: a sharded student on any number of
    processes, or an unsharded one (DDP, or one process) that takes the whole state (collective when several)."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the target layout, states initialised
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load an unsharded run's `optimizer.state_dict()` (its parameters by index, the trainable ones in order)
    into the optimizer of the sharded `model`; every rank passes the whole dict and keeps its shards."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    by_name = {"state": {names[i]: state for i, state in saved["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def write_full_model(model: nn.Module, path: Path, weights: dict[str, Tensor]) -> None:
    """On rank 0: `save_pretrained` the sharded `model` with its gathered `weights` (from `full_state_dict`) as
    one plain model that transformers (and vLLM) load by path, under its own class name."""
    model.save_pretrained(path, state_dict=weights)
    plain = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    model.config.architectures = [plain.__name__]  # save_pretrained wrote the FSDP subclass's name
    model.config.save_pretrained(path)


class Parallel(ABC):
    """How the student trains over the processes, built once at the start over the unwrapped student `policy` and
    its optimizer: `Replicated` or `Sharded`, whose methods the loop calls alike."""

    def __init__(self, accelerator: Any, policy: nn.Module, optimizer: torch.optim.Optimizer,
                 teacher: nn.Module | None):
        self.accelerator = accelerator
        # processes, this one's index, whether it is the main one: fixed for the run, read on every micro-batch
        self.world, self.rank, self.main = (accelerator.num_processes, accelerator.process_index,
                                            accelerator.is_main_process)
        self.policy = policy  # unwrapped: sampling, evaluation, the engine's weights
        self.teacher = teacher
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.adamw = optimizer  # the plain optimizer, whose state a checkpoint restores
        self.student, self.optimizer = self._prepare(policy, optimizer)  # as trained, as stepped
        # a sharded model's forwards need every rank, so every rank evaluates and samples the report
        self.every_rank_samples = is_sharded(policy) or is_sharded(teacher)

    @abstractmethod
    def _prepare(self, policy: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """(the student as trained, the optimizer as stepped)."""

    @abstractmethod
    def accumulating(self, sync: bool) -> AbstractContextManager:
        """Where a micro-batch's backward runs: gradients reduce across ranks only when `sync` (the last one)."""

    @abstractmethod
    def backward(self, loss: Tensor) -> None:
        """Backpropagate a micro-batch's share of the loss."""

    @abstractmethod
    def clip(self, max_norm: float) -> Tensor:
        """The gradients' global L2 norm, and the gradients clipped to `max_norm` if > 0."""

    @abstractmethod
    def save(self, out: Path, step: int, processor: Any, state: dict[str, Any], keep_last: int,
             run_id: str) -> None:
        """Checkpoint `step` (trainer `state` without the optimizer's); every rank calls it and waits for the rest."""

    @abstractmethod
    def _load_full_optimizer(self, saved: dict) -> None:
        """Load an unsharded run's `optimizer.state_dict()`."""

    def load_optimizer(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """The checkpoint's optimizer state into this run's, whichever layout wrote it."""
        if (checkpoint / "optimizer").is_dir():  # a sharded run's DCP shards: they reshard to this layout
            load_optimizer(self.policy, self.adamw, checkpoint / "optimizer")
        else:
            self._load_full_optimizer(state["optimizer"])

    def mean_over_ranks(self, row: dict[str, float], stopping: bool) -> tuple[dict[str, float], bool]:
        """Every rank's metrics' mean (what each process logs), and whether any rank is stopping."""
        if self.world == 1:
            return row, stopping
        values = self.accelerator.reduce(torch.tensor([*row.values(), float(stopping)], device=self.accelerator.device),
                                         "mean").tolist()
        return dict(zip(row, values[:-1])), values[-1] > 0

    def reshard_teacher(self) -> None:
        reshard(self.teacher)


class Replicated(Parallel):
    """The student whole on every process: plain on one process, DDP (accelerate's) on several."""

    def _prepare(self, policy: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return self.accelerator.prepare(policy, optimizer)

    def accumulating(self, sync: bool) -> AbstractContextManager:
        return self.accelerator.no_sync(self.student) if not sync else nullcontext()

    def backward(self, loss: Tensor) -> None:
        self.accelerator.backward(loss)

    def clip(self, max_norm: float) -> Tensor:
        if max_norm > 0:
            return self.accelerator.clip_grad_norm_(self.params, max_norm)
        return torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.params if p.grad is not None))

    def save(self, out: Path, step: int, processor: Any, state: dict[str, Any], keep_last: int,
             run_id: str) -> None:
        if self.main:
            save_checkpoint(out, step, self.accelerator.unwrap_model(self.student), processor,
                            {**state, "optimizer": self.optimizer.state_dict()}, keep_last, run_id)
        self.accelerator.wait_for_everyone()

    def _load_full_optimizer(self, saved: dict) -> None:
        self.adamw.load_state_dict(saved)


class Sharded(Parallel):
    """The student sharded over the processes with FSDP2 (train.sharding=fsdp): not wrapped in DDP, since FSDP2
    reduces its gradients itself; the optimizer holds sharded state."""

    def _prepare(self, policy: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return policy, optimizer

    def accumulating(self, sync: bool) -> AbstractContextManager:
        return gradient_sync(self.student, sync)

    def backward(self, loss: Tensor) -> None:
        loss.backward()  # FSDP2's hooks reduce-scatter the gradients

    def clip(self, max_norm: float) -> Tensor:
        return clip_grad_norm(self.params, max_norm)

    def save(self, out: Path, step: int, processor: Any, state: dict[str, Any], keep_last: int,
             run_id: str) -> None:
        """Every rank gathers the full weights onto rank 0, which writes `model/` (a LoRA student's merged, its
        adapters in `lora/`) and the trainer state; every rank writes its optimizer shards into `optimizer/`."""
        weights = full_state_dict(self.policy)
        tmp = checkpoint_dir(out) / f".tmp-step-{step}-sharded"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        save_optimizer(self.policy, self.optimizer, tmp / "optimizer")
        if self.main:
            commit_checkpoint(out, step, tmp, lambda: _write_gathered(self.policy, tmp, weights), processor, state,
                              keep_last, run_id)
        dist.barrier()
        self.accelerator.wait_for_everyone()

    def _load_full_optimizer(self, saved: dict) -> None:
        load_full_optimizer(self.policy, self.adamw, saved)


def parallel(accelerator: Any, policy: nn.Module, optimizer: torch.optim.Optimizer, teacher: nn.Module | None,
             sharded: bool) -> Parallel:
    """How the student trains over the processes, chosen once: `Sharded` for train.sharding=fsdp (the student
    already sharded by `shard`), else `Replicated`."""
    return (Sharded if sharded else Replicated)(accelerator, policy, optimizer, teacher)


def _write_gathered(model: nn.Module, tmp: Path, weights: dict[str, Tensor]) -> None:
    """A sharded student's `model/` (and a LoRA one's `lora/`) from its gathered full `weights`."""
    if is_lora(model):
        model.save_pretrained(tmp / "lora", state_dict=weights)  # peft keeps the adapters' entries
        write_full_model(model.get_base_model(), tmp / "model", merged_weights(model, weights))
    else:
        write_full_model(model, tmp / "model", weights)
