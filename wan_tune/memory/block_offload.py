"""Plan rung: block offload (`train.offload=blocks`, `train.offload_keep`).

Frozen base weights that wait in host memory until a forward needs them.

Two uses: `train.offload=blocks` (transformer blocks stream to the GPU one at a time, so a 14B
LoRA trains on a 24 GB card) and Wan2.2 A14B runs that train both experts (the idle expert's
frozen weights leave the GPU while the other one trains).

Only frozen weights move, and only one way: their host copy never changes, so offloading a group
just drops its device copy (no device-to-host traffic). On a GPU the host copies are views into a
pinned `HostArena` (memory/host_arena.py): torch's pinned allocator would round each weight up to a
power of two (a 14B fp8 block: 512 MiB pinned for 335 MiB). LoRA weights, gradients and optimizer
state never leave the device.

Why not diffusers' group offloading (`diffusers.hooks.apply_group_offloading`, 0.42): it moves
every parameter of a group, the trainable LoRA weights too. With streams, each offload puts back
the pinned host copy taken when the hook was applied (`ModuleGroup._offload_to_memory`), so every
onload resets the adapter to its initial values and training learns nothing; between steps the
adapter sits on the host while its gradients and AdamW state are on the GPU. Without streams it
copies every weight back to the host after each forward.

Why the backward is safe: autograd saves views of the weights it needs (a linear saves
`weight.t()`), and a view keeps the device copy alive after the block's post-forward hook has
dropped it, until that part of the backward has run. With gradient checkpointing (required: without
it, those saved views would keep every block on the device) the forward saves nothing of a block,
and the recompute in the backward calls the block again, so its pre-forward hook loads it again
and prefetches the block before it (the backward walks the blocks in reverse).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .activation_offload import in_checkpointed_forward
from .host_arena import HostArena


def in_backward() -> bool:
    """True inside autograd's backward (a checkpointed block's recompute runs there)."""
    return torch._C._current_graph_task_id() != -1


def frozen_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if not p.requires_grad]


class WeightGroup:
    """Frozen parameters kept in host memory (pinned when the device is a GPU), on the device only
    between `onload` and `offload`. While offloaded each parameter holds an empty placeholder of
    its dtype on the device, so a forward that was not given its weights fails at once."""

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device, arena: HostArena | None = None):
        """`arena`: where the host copies go (a GPU's default: one of their own, pinned; a CPU's: none,
        the parameters' own storage)."""
        self.params = params
        self.device = torch.device(device)
        if arena is None and self.device.type == "cuda":
            arena = HostArena(pin=True, expected=[p.numel() * p.element_size() for p in params])
        # Each host copy replaces the parameter's storage before the next is made: loading never
        # holds two copies of more than one tensor (and the arena's slab being filled).
        self.host = []
        for p in params:
            data = p.data.to("cpu")
            if arena is not None:
                data = arena.take(data.shape, data.dtype).copy_(data)
            self.host.append(data)
            p.data = torch.empty(0, dtype=data.dtype, device=self.device)
        self.resident = False
        self._event = None
        self.nbytes = sum(h.numel() * h.element_size() for h in self.host)
        self.transfers = 0
        """Copies to the device made (an onload of a group already there makes none)."""

    @torch.compiler.disable
    def onload(self, stream=None) -> None:
        """Copy to the device; on `stream` (a side CUDA stream) without waiting for it."""
        if self.resident:
            return
        self.transfers += 1
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for p, h in zip(self.params, self.host):
                p.data = h.to(self.device, non_blocking=True)
            if stream is not None:
                self._event = torch.cuda.Event()
                self._event.record(stream)
        self.resident = True

    @torch.compiler.disable
    def ready(self) -> None:
        """Make the compute stream wait for a prefetch, and tell the allocator the compute stream
        uses those tensors (so their memory is not reused before it is done with them)."""
        if self._event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self._event)
        for p in self.params:
            p.data.record_stream(compute)
        self._event = None

    @torch.compiler.disable
    def offload(self) -> None:
        for p, h in zip(self.params, self.host):
            p.data = torch.empty(0, dtype=h.dtype, device=self.device)
        self.resident = False
        self._event = None


class BlockOffload:
    """`train.offload=blocks`: the transformer blocks after the first `keep` live in host memory;
    each is loaded just before it runs (while the one before it computes, on a side stream) and
    dropped once it is done. `loads` counts the loads done in forwards and in backward recomputes.
    After a training step block 0, if streamed, stays loaded: the next forward starts with it."""

    def __init__(self, model: torch.nn.Module, keep: int, device: torch.device, arena: bool | None = None):
        """`arena`: the streamed blocks' host copies in one `HostArena` (default: on a GPU, pinned)."""
        blocks = list(model.blocks)
        if not 0 <= keep < len(blocks):
            raise ValueError(f"train.offload_keep={keep}: the model has {len(blocks)} blocks; keep 0 to {len(blocks) - 1}")
        pin = torch.device(device).type == "cuda"
        streamed = [frozen_parameters(b) for b in blocks[keep:]]
        self.arena = HostArena(pin, [p.numel() * p.element_size() for ps in streamed for p in ps]) if (
            pin if arena is None else arena) else None
        self.groups = [None] * keep + [WeightGroup(ps, device, self.arena) for ps in streamed]
        self.stream = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None
        self.loads = {"forward": 0, "recompute": 0}
        self.handles = []
        for i, block in enumerate(blocks):  # every block: a kept one prefetches the first streamed one
            self.handles.append(block.register_forward_pre_hook(self._before(i)))
            self.handles.append(block.register_forward_hook(self._after(i)))

    @property
    def transfers(self) -> int:
        """Block copies to the device made so far."""
        return sum(g.transfers for g in self.groups if g is not None)

    @property
    def offloaded_parameters(self) -> set[int]:
        return {id(p) for g in self.groups if g is not None for p in g.params}

    def _before(self, i: int):
        @torch.compiler.disable
        def hook(_module, _args):
            backward = in_backward()
            group = self.groups[i]
            if group is not None:
                group.onload()  # no-op when a prefetch already did it
                group.ready()
                self.loads["recompute" if backward else "forward"] += 1
            # Prefetch the block that runs next: the backward recomputes blocks in reverse.
            nxt = i - 1 if backward else i + 1
            if 0 <= nxt < len(self.groups) and self.groups[nxt] is not None:
                self.groups[nxt].onload(self.stream)
            # In the backward, block i+1 is done once block i recomputes. Its post-forward hook
            # never ran: the checkpoint's recompute stops early, as soon as it has what the
            # backward needs. (Its weights' saved views, if any remain, keep them alive.)
            if backward and i + 1 < len(self.groups) and self.groups[i + 1] is not None:
                self.groups[i + 1].offload()

        return hook

    def _after(self, i: int):
        @torch.compiler.disable
        def hook(_module, _args, _output):
            if self.groups[i] is None or in_backward():
                return  # the backward offloads in the pre-forward hook of the block below
            if i == len(self.groups) - 1 and (torch.is_grad_enabled() or in_checkpointed_forward()):
                return  # the backward starts by recomputing the last block: keep it
            self.groups[i].offload()

        return hook


class ExpertSwap:
    """Wan2.2 A14B with both experts trained: a forward of one expert first moves the other's
    frozen weights (those not already streamed by `BlockOffload`) to host memory, then loads its
    own. Hooked on the model, so training steps and validation renders alike hold one expert."""

    def __init__(self, device: torch.device):
        self.device = device
        self.groups: list[WeightGroup] = []
        self.streams: list[BlockOffload | None] = []
        self.index: dict[int, int] = {}  # id(model) -> its group
        self.handles = []
        self.swaps = 0

    def add(self, model: torch.nn.Module, blocks: BlockOffload | None = None) -> None:
        """Park `model`'s frozen weights in host memory until its first forward."""
        streamed = blocks.offloaded_parameters if blocks is not None else set()
        self.groups.append(WeightGroup([p for p in frozen_parameters(model) if id(p) not in streamed], self.device))
        self.streams.append(blocks)
        self.index[id(model)] = len(self.groups) - 1
        self.handles.append(model.register_forward_pre_hook(self._before(len(self.groups) - 1)))

    def prefetch(self, model: torch.nn.Module) -> None:
        """Swap `model` in now (the next step's expert, known once a step is done; audit B14). The copies
        go on the compute stream, queued behind the step just run and without holding the host up, so
        they overlap what the host does between steps (metrics, the next batch); on a side stream
        they would need room for both experts at once, since the allocator does not hand a block one
        stream freed to another stream."""
        self._swap_in(self.index[id(model)])

    def _swap_in(self, k: int) -> None:
        if self.groups[k].resident:
            return
        for other, group in enumerate(self.groups):
            if other != k:
                group.offload()
                # BlockOffload leaves a streamed block 0 loaded after a step, for the next forward:
                # the idle expert's next forward is not next.
                for streamed in self.streams[other].groups if self.streams[other] is not None else ():
                    if streamed is not None:
                        streamed.offload()
        self.groups[k].onload()
        self.swaps += 1

    def _before(self, k: int):
        @torch.compiler.disable
        def hook(_module, _args):
            self._swap_in(k)

        return hook
