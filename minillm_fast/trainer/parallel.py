"""Multi-process training: one process per device, launched by ``torchrun``, data-parallel over the step batch.

What each rank does (the README's "Multi-process training" section explains launching and scaling):

* **rollouts**: rank r generates (and, for MiniLLM, scores) the r-th contiguous slice of the round's prompts;
  the scored sequences (token ids and four float32 values per token, a few MB) are all-gathered, so every rank
  holds the round's buffer and shuffles it as one process would;
* **optimisation**: each optimizer step's batch (``batch_size x grad_accum_steps`` sequences, the same shuffle on
  every rank) is cut into ``world_size`` contiguous slices; rank r runs forward and backward on slice r only
  (micro-batches of at most ``batch_size``). The step's valid-token count and MiniLLM's whitening statistics are
  all-reduced, every loss divides its token sum by the global count, and gradients are **summed** over ranks
  (not averaged), so the update is the single-process update on the same global batch;
* **student**: ``parallel=ddp`` wraps it in ``DistributedDataParallel`` (a full replica per rank, gradients
  all-reduced once per optimizer step: ``no_sync`` on every micro-batch but the last); ``parallel=fsdp`` shards
  parameters, gradients and AdamW states with FSDP2's ``fully_shard`` (each decoder layer, then the root);
* **teacher**: inference only (no gradient, no optimizer state): ``replicate`` keeps a full copy per rank,
  ``shard`` applies ``fully_shard`` too, trading memory for one all-gather per layer per forward;
* **sampling noise** comes from one generator per sequence, seeded by (seed, round, index in the round), and each
  sequence has its own length budget, so rollouts do not depend on the world size or on how prompts are batched
  (``rollout_seeding=sequence``);
* **checkpoints and logs**: only rank 0 writes (atomically, as one process does); FSDP gathers full weights and
  optimizer states to rank 0 first, so a checkpoint is the same whatever wrote it and any world size that
  divides the batch can resume it. Every rank reads the checkpoint it resumes: ``output_dir`` must be on a file
  system all nodes see.

Sharded models run collectives inside every forward, so all ranks must call them equally often: while some rank
still generates, a rank whose sequences are done runs a one-token dummy forward of each sharded model per
decoding step (``Lockstep``). Replicated models (DDP mode, replicated teacher) generate without communication.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("minillm_fast.trainer")

PARALLEL = ("ddp", "fsdp")
TEACHER_SHARDING = ("auto", "replicate", "shard")
ROLLOUT_SEEDING = ("auto", "stream", "sequence")


@dataclass
class Dist:
    """This process's place in the job. ``group`` is None in a single process (every helper is then a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, items):
        """This rank's contiguous slice of ``items`` (a list or a sequence of indices), whose length must divide."""
        n = len(items)
        if n % self.world_size:
            raise ValueError(f"cannot split {n} items over {self.world_size} processes")
        k = n // self.world_size
        return items[self.rank * k:(self.rank + 1) * k]

    def shard_uneven(self, n: int) -> range:
        """Indices of this rank's contiguous slice of ``n`` items: ceil(n / world_size) each, the last ones
        shorter (possibly empty)."""
        k = -(-n // self.world_size)
        return range(min(n, self.rank * k), min(n, (self.rank + 1) * k))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def any(self, flag: bool, device) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def all_gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.group)


def init(device_name: str) -> tuple[Dist, torch.device]:
    """Join the job ``torchrun`` started (``WORLD_SIZE`` > 1 in the environment), or run alone.

    Initialises the default process group from the environment unless the caller already has (backend nccl for
    CUDA devices, gloo otherwise), and picks this process's device: ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``
    when CUDA is available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda" and device.index is None and world_size > 1:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if world_size <= 1:
        return Dist(), device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        log.info("process group: %s, rank %d of %d, device %s", backend, dist.get_rank(), world_size, device)
    return Dist(dist.get_rank(), world_size, local_rank, dist.group.WORLD), device


def check_divisible(cfg, world_size: int, uses_pt: bool) -> None:
    """The batch splits the run needs, as ValueErrors that say what to change."""
    if world_size <= 1:
        return
    step = cfg.batch_size * cfg.grad_accum_steps
    needs = [("batch_size x grad_accum_steps", step, "the optimizer step's global batch"),
             ("num_rollouts", cfg.num_rollouts, "the sequences collected per round")]
    if uses_pt:
        needs.append(("pt_batch_size", cfg.pt_batch_size, "the PT-loss blocks per optimizer step"))
    for name, value, what in needs:
        if value % world_size:
            raise ValueError(f"config {name} = {value} ({what}) is not divisible by the world size {world_size}: "
                             f"each process takes an equal contiguous slice; choose a world size that divides it "
                             f"or change {name}")


def resolve_seeding(requested: str, world_size: int, resumed: str | None) -> str:
    if requested == "stream" and world_size > 1:
        raise ValueError("config rollout_seeding: 'stream' draws every rollout from one generator, which several "
                         "processes cannot share; use 'sequence' (or 'auto') with more than one process")
    if requested != "auto":
        return requested
    return "sequence" if world_size > 1 or resumed == "sequence" else "stream"


def sequence_seed(seed: int, round_: int, index: int) -> int:
    """Seed of sequence ``index`` of round ``round_``: a function of these alone, not of ranks or batching."""
    return ((seed * 1_000_003 + round_) * 1_000_033 + index) % (2 ** 63)


def sequence_generators(seed: int, round_: int, indices, device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(sequence_seed(seed, round_, i)) for i in indices]


# ----------------------------------------------------------------------------------------------------------
# Wrapping the models
# ----------------------------------------------------------------------------------------------------------

def _layer_classes(model) -> set[str]:
    return set(getattr(model, "_no_split_modules", None) or ())


def _fully_shard(model, *, trainable: bool):
    """FSDP2: every decoder layer (the classes the model lists in ``_no_split_modules``), then the root, which
    keeps the embeddings, final norm and output layer (tied weights stay in one group). Every unit, the root
    included, reshards after each forward (FSDP2 keeps the root gathered by default, which would leave the
    embeddings and output layer, the biggest group with a large vocabulary, whole between sampling steps)."""
    from torch.distributed.fsdp import fully_shard

    names = _layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not layers:
        log.warning("%s lists no decoder-layer classes (_no_split_modules): sharding it as one unit, so each "
                    "forward all-gathers the whole model", type(model).__name__)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    if trainable:  # gradients are summed over ranks (each loss already divides by the global token count)
        for unit in layers + [model]:  # factor 1 with plain SUM collectives (gloo has no PREMUL_SUM)
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return model


def _broadcast_parameters(model, group) -> None:
    """Make rank 0's weights everyone's before sharding (DDP does this itself)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0, group=group)


def _sum_allreduce_hook(process_group, bucket):
    """DDP communication hook: SUM the gradient buckets (the default hook averages them)."""
    group = process_group if process_group is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_student(student, parallel: str, d: Dist, device):
    if not d.enabled:
        return student
    if parallel == "fsdp":
        _broadcast_parameters(student, d.group)
        return _fully_shard(student, trainable=True)
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    # buffers (rotary tables) are constants: no broadcast before every forward (the argument's newer name first)
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
        inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False}
    # gradient_as_bucket_view: gradients live in the all-reduce buckets (no second copy of them)
    ddp = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None,
                                  process_group=d.group, gradient_as_bucket_view=True, **no_buffer_sync)
    ddp.register_comm_hook(d.group, _sum_allreduce_hook)
    return ddp


def wrap_teacher(teacher, sharding: str, d: Dist):
    if teacher is None or not d.enabled or sharding != "shard":
        return teacher
    _broadcast_parameters(teacher, d.group)
    return _fully_shard(teacher, trainable=False)


def unwrap(model):
    """The Hugging Face model inside a DDP wrapper (FSDP2 shards in place: the module is the model)."""
    return getattr(model, "module", model) if _is_ddp(model) else model


def _is_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def is_sharded(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def gradient_sync(model, last: bool):
    """Context for one micro-batch's forward and backward: DDP all-reduces only on the step's last one."""
    if _is_ddp(model) and not last:
        return model.no_sync()
    return nullcontext()


def grad_norm_value(norm) -> float:
    """``clip_grad_norm_``'s result as a float (a replicated DTensor under FSDP)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ----------------------------------------------------------------------------------------------------------
# Generation in lockstep with sharded models
# ----------------------------------------------------------------------------------------------------------

class Lockstep:
    """Keeps the ranks' forwards of sharded models matched while their generation lengths differ."""

    def __init__(self, d: Dist, device):
        self.d, self.device = d, device

    def any_running(self, running: bool) -> bool:
        return self.d.any(running, self.device)

    @torch.no_grad()
    def idle_forward(self, models) -> None:
        """One dummy one-token forward of each sharded model, in the order a real step calls them."""
        token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        for model in models:
            if is_sharded(model):
                model(input_ids=token, attention_mask=torch.ones_like(token), position_ids=torch.zeros_like(token),
                      use_cache=False)

    def idle_generation(self, models) -> None:
        """Take part in the others' decoding steps with nothing to decode."""
        while self.any_running(False):
            self.idle_forward(models)


def lockstep_for(d: Dist, device, *models) -> Lockstep | None:
    if d.enabled and any(m is not None and is_sharded(m) for m in models):
        return Lockstep(d, device)
    return None


# ----------------------------------------------------------------------------------------------------------
# Checkpoint state: the same format whatever the wrapping
# ----------------------------------------------------------------------------------------------------------

def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(**kw)


def full_model_state(student, d: Dist):
    """Full weights on rank 0 (None elsewhere; None also means 'the model's own state_dict' when not sharded)."""
    if not is_sharded(student):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    state = get_model_state_dict(student, options=_state_dict_options(full_state_dict=True, cpu_offload=True))
    return state if d.is_main else None


def full_optimizer_state(student, optimizer, d: Dist) -> dict | None:
    """``optimizer.state_dict()`` of an unsharded model (parameters numbered in ``parameters()`` order) on
    rank 0, whatever the wrapping: FSDP gathers the shards first. None on other ranks."""
    if not is_sharded(student):
        return optimizer.state_dict() if d.is_main else None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(student, optimizer,
                                     options=_state_dict_options(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return None
    index = {name: i for i, (name, _) in enumerate(student.named_parameters())}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def load_optimizer_state(student, optimizer, state: dict) -> None:
    """Load a checkpoint's (unsharded-format) optimizer state into any wrapping, any world size."""
    if not is_sharded(student):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    names = [name for name, _ in student.named_parameters()]
    by_name = {"state": {names[i]: value for i, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(student, optimizer, by_name, options=_state_dict_options(full_state_dict=True))
