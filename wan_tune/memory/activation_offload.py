"""Plan rungs: checkpointing (`train.gradient_checkpointing`: BlockCheckpoint) and activation offload.

`train.activation_offload`: each checkpointed block's input waits in host memory between the
block's forward and its recompute in the backward.

With gradient checkpointing a block keeps one tensor for the backward: its input (at 480x832x81
on the 14B, 32,760 tokens x 5,120 x bf16 = 320 MiB, times 40 blocks = 12.5 GiB). That tensor is
what moves here; everything else stays where it is.

Why not torch's tools. `torch.autograd.graph.save_on_cpu` moves saved tensors, and diffusers'
non-reentrant checkpoint keeps a block's inputs in the recompute closure, not as saved tensors, so
it moves nothing. Handing torch's checkpoint a host copy of the input instead does move it, but
autograd then routes the input's gradient through that host copy: every block's input gradient
would cross PCIe twice more per step (device -> host -> device), because autograd requires a
tensor's gradient on the tensor's own device.

So `OffloadedBlock` stands in for the checkpoint around each block (diffusers takes it through
`enable_gradient_checkpointing(gradient_checkpointing_func=...)`), a custom autograd Function:
- forward: starts an asynchronous copy of the block's input into a pinned host buffer (a side
  CUDA stream; buffers are reused step after step), records the RNG and autocast state, and runs
  the block without autograd, as a checkpoint does;
- backward: takes the input back (copied while the block after it recomputed: one block of
  prefetch), recomputes the block under autograd with the same RNG and autocast state,
  backpropagates the output gradient through it (its parameters' gradients accumulate as usual)
  and returns the gradients of the inputs that need one, on their own device.
A zero-size tensor that needs a gradient rides along as an input, so the backward runs for block 0
too, whose input (the patch embedding of frozen weights) needs none while its LoRA weights do.

The same Function without a host stash (`BlockCheckpoint`, the input saved on the device) is the
block checkpoint under train.attention_checkpointing: its recompute may nest checkpoints that the
first forward does not have, which torch's checkpoint refuses (memory/working_set.py).

On a CPU the host buffer is an ordinary tensor and the copies are synchronous: the same code path
runs, which is what the tests check (losses and gradients equal to torch's checkpoint, copies counted).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .host_arena import HostArena


@dataclass
class HostStash:
    """Host copies of block inputs, by slot (the block's index), reused from step to step. Each slot
    keeps a region of a `HostArena` (pinned on a GPU, without power-of-two rounding) as large as
    the largest input it held: a smaller bucket's input reuses it."""

    slots: int = 1
    """Blocks that stash their input: the arena is sized for that many inputs of the first size seen."""
    buffers: dict[int, torch.Tensor] = field(default_factory=dict)
    regions: dict[int, torch.Tensor] = field(default_factory=dict)
    """Slot -> its bytes in the arena (uint8)."""
    arena: HostArena | None = None
    pending: dict[int, tuple[torch.Tensor, object]] = field(default_factory=dict)
    """Slot -> (device tensor, CUDA event) of a copy back already started (the prefetch)."""
    copies: dict[str, int] = field(default_factory=lambda: {"out": 0, "back": 0})
    streams: dict[torch.device, object] = field(default_factory=dict)

    def _buffer(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        n = x.numel() * x.element_size()
        if self.arena is None:
            self.arena = HostArena(pin=x.device.type == "cuda", expected=[n] * self.slots)
        region = self.regions.get(slot)
        if region is None or region.numel() < n:  # a larger bucket than this slot held: a larger region
            slab, offset = self.arena.take_bytes(n)
            region = self.regions[slot] = slab[offset:offset + n]
        return region[:n].view(x.dtype).view(x.shape)

    def _stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def put(self, slot: int, x: torch.Tensor) -> None:
        """Copy `x` out to the slot's host buffer (asynchronously on a GPU)."""
        host = self.buffers.get(slot)
        if host is None or host.shape != x.shape or host.dtype != x.dtype:
            host = self.buffers[slot] = self._buffer(slot, x)
        stream = self._stream(x.device)
        if stream is None:
            host.copy_(x)
        else:
            stream.wait_stream(torch.cuda.current_stream(x.device))  # x is computed
            with torch.cuda.stream(stream):
                host.copy_(x, non_blocking=True)
            x.record_stream(stream)  # its memory is not reused before the copy has read it
        self.copies["out"] += 1

    def _fetch(self, slot: int, device: torch.device) -> None:
        if slot in self.pending or slot not in self.buffers:
            return
        stream = self._stream(device)
        if stream is None:
            self.pending[slot] = (self.buffers[slot].clone(), None)
        else:
            with torch.cuda.stream(stream):  # after the copy out, which ran on this stream too
                back = self.buffers[slot].to(device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            self.pending[slot] = (back, event)
        self.copies["back"] += 1

    def take(self, slot: int, device: torch.device) -> torch.Tensor:
        """The slot's input on `device` again, and the copy of the slot before it started (the
        backward recomputes blocks last to first)."""
        self._fetch(slot, device)
        back, event = self.pending.pop(slot)
        if event is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(event)
            back.record_stream(current)
        self._fetch(slot - 1, device)
        return back


class OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: "_Call", anchor: torch.Tensor, x: torch.Tensor, *args):
        ctx.call, ctx.x_device, ctx.x_grad = call, x.device, x.requires_grad
        ctx.tensor_args = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        kept = [args[i] for i in ctx.tensor_args]
        if call.stash is None:  # the input stays on the device, saved as a checkpoint saves it
            kept.append(x)
        else:
            call.stash.put(call.slot, x)
        ctx.save_for_backward(*kept)
        ctx.other_args = [None if torch.is_tensor(a) else a for a in args]
        ctx.rng = _rng_state(x.device)
        ctx.autocast = [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
                        for t in {x.device.type, "cpu"} if torch.amp.is_autocast_available(t)]  # not on meta
        _CHECKPOINTED_FORWARD.append(call.slot)
        try:
            return call.run(call.block, x, *args)
        finally:
            _CHECKPOINTED_FORWARD.pop()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        call = ctx.call
        saved_tensors = ctx.saved_tensors
        x = saved_tensors[-1] if call.stash is None else call.stash.take(call.slot, ctx.x_device)
        x = x.detach().requires_grad_(ctx.x_grad)
        args = list(ctx.other_args)
        for i, saved in zip(ctx.tensor_args, saved_tensors):
            args[i] = saved.detach().requires_grad_(saved.requires_grad)
        with torch.enable_grad(), _restored_rng(ctx.rng, ctx.x_device), contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            out = call.run(call.block, x, *args)
        torch.autograd.backward(out, grad_out)
        grads = [None] * len(args)
        for i in ctx.tensor_args:
            grads[i] = args[i].grad if args[i].requires_grad else None
        return (None, None, x.grad if ctx.x_grad else None, *grads)


_CHECKPOINTED_FORWARD: list[int] = []  # slots of the blocks whose first forward is running inside OffloadedBlock


def in_checkpointed_forward() -> bool:
    """True while a block's first forward runs inside wan-tune's checkpoint (grad is off there, yet a
    backward will recompute the block: memory/block_offload.py keeps the last block for it)."""
    return bool(_CHECKPOINTED_FORWARD)


def _run(block: torch.nn.Module, *args):
    return block(*args)


@dataclass
class _Call:
    block: torch.nn.Module
    slot: int
    stash: HostStash | None
    run: object = _run


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _restored_rng(state: tuple, device: torch.device):
    """The forward's RNG state for the recompute (LoRA dropout draws the same mask), the outer
    state untouched afterwards, as torch's checkpoint does it."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else [], device_type="cuda"):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


class BlockCheckpoint:
    """The checkpoint function for one transformer: `model.enable_gradient_checkpointing(it)`.
    Without a stash each block's input stays on the device (a plain checkpoint, under which nested
    checkpoints may run in the recompute only: train.attention_checkpointing, whose inner
    checkpoints torch's own checkpoint would count as a forward/recompute mismatch). `run(block,
    *args)`: how a block is called, in the forward and in the recompute (the planner enters its
    emulated kernels there)."""

    def __init__(self, model: torch.nn.Module, stash: HostStash | None = None, run=_run):
        self.slots = {id(block): i for i, block in enumerate(model.blocks)}
        self.stash, self.run = stash, run
        self.anchor = torch.empty(0, requires_grad=True)  # makes every block's backward run (see the module docstring)

    def __call__(self, block: torch.nn.Module, hidden_states: torch.Tensor, *args):
        if id(block) not in self.slots:  # a VACE block (two outputs, nothing nested in it): torch's checkpoint
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.run, block, hidden_states, *args, use_reentrant=False)
        anchor = self.anchor if self.anchor.device == hidden_states.device else self._move_anchor(hidden_states.device)
        call = _Call(block, self.slots[id(block)], self.stash, self.run)
        return OffloadedBlock.apply(call, anchor, hidden_states, *args)

    def _move_anchor(self, device: torch.device) -> torch.Tensor:
        self.anchor = torch.empty(0, device=device, requires_grad=True)
        return self.anchor


class ActivationOffload(BlockCheckpoint):
    """`train.activation_offload`: the block checkpoint whose inputs wait in host memory."""

    def __init__(self, model: torch.nn.Module, run=_run):
        super().__init__(model, HostStash(slots=len(model.blocks)), run)

    @property
    def copies(self) -> dict[str, int]:
        return dict(self.stash.copies)

    @property
    def host_bytes(self) -> int:
        """Bytes of the inputs stashed (the payload)."""
        return sum(b.numel() * b.element_size() for b in self.stash.buffers.values())

    @property
    def reserved_bytes(self) -> int:
        """Bytes of host memory the stash holds (its arena's slabs)."""
        return self.stash.arena.reserved_bytes if self.stash.arena is not None else 0


def block_checkpoint(model: torch.nn.Module, train, run=_run):
    """The checkpoint function the recipe's settings call for: inputs to the host
    (train.activation_offload), ours on the device (train.attention_checkpointing, or ring
    attention: diffusers' ring backward reads its saved tensors, then its kernel's backward op reads
    them again, which torch's checkpoint refuses: "Unpack is being triggered for a tensor that was
    already unpacked once"; ours recomputes the block with plain autograd), or None: diffusers'
    default (torch's non-reentrant checkpoint)."""
    if train.activation_offload:
        return ActivationOffload(model, run)
    ring = train.context_parallel > 1 and train.context_parallel_kind == "ring"
    if train.attention_checkpointing or ring:
        return BlockCheckpoint(model, None, run)
    return None
