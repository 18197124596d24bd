"""One training step run on the meta device: what it keeps for the backward and its peak, counted.

Nothing is allocated and no weight is read: the transformer is built on `torch.device("meta")`
(shapes and dtypes only), set up by the trainer's own `adapt` (LoRA, fp8 storage, gradient
checkpointing) and driven through the trainer's own `flow_matching.predict`, loss and backward on a
meta batch of the run's shape. Two counters watch the step:

- saved: unique storages autograd keeps for the backward, parameters excluded (what
  bench/memory.py counts on a real run);
- peak: the most bytes alive at once over forward and backward, counting every storage an operator
  creates (the batch, activations, recomputed blocks, gradients of activations, temporaries) and
  taking off the weights' storages that fp8 casting swaps out. Parameters' gradients are left out:
  the plan counts them with the trainable state. Memory a kernel allocates inside itself
  (workspaces) is not seen.

Both are also read at the end of each block's forward: what block 1 adds is what every further
block adds, so a 2-block model gives the count of any depth (`StepCount.extend`).

Two things the real device does that meta tensors do not are emulated (`DeviceKernels`):

- attention: on meta tensors SDPA takes PyTorch's math path (an S x S score matrix per head); CPUs
  and GPUs run a fused kernel that saves q, k, v, the output and the log-sum-exp. SDPA here calls the
  CPU flash kernel, whose meta implementation has exactly those shapes (the GPU's flash and cuDNN
  kernels save the same set; the memory-efficient one pads the log-sum-exp).
- autocast, which does not apply to meta tensors: the inputs of the ops autocast runs in low
  precision (linears, convolutions, matmuls, attention) are cast, and casts of trainable leaves are
  cached for the step, as torch's autocast cache does. Planning for a GPU, the inputs of the ops on
  CUDA autocast's fp32 list (RMS and layer norms, softmax) are cast to fp32 as CUDA's autocast does
  (a CPU's does not): Wan's q and k are fp32 on a GPU.

Both were checked against real CPU steps of the tiny model (fp32, fp8 base, and bf16 under CPU
autocast, with CUDA's fp32 list emulated or not, checkpointing on and off): saved and peak bytes identical. Gradient checkpointing runs
diffusers' own function (non-reentrant torch checkpoint) with the emulation entered again inside
the recompute: the recompute runs in the backward, where function modes are not active.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from wan_tune.models.precision import on_cuda_fp32_list

# The ops autocast runs in its low-precision dtype (torch's CUDA and CPU lists agree on these; the
# rest of Wan's forward sets its dtypes explicitly with .float() / .type_as()).
LOW_PRECISION_OPS = frozenset(
    {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
     torch.Tensor.__matmul__}
)
# The functions on CUDA autocast's fp32 list (CPU autocast has none of them) that a transformer's
# forward reaches: on a GPU with a torch after 2.11, Wan's q/k RMS norms return fp32 q and k (twice
# the bytes of the bf16 ones), which rope and the attention's cast to bf16 then read
# (models/precision.py, on_cuda_fp32_list: the installed torch's list is the one counted).
CUDA_FP32_FUNCTIONS = frozenset(
    {F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.softmax, torch.softmax, torch.Tensor.softmax,
     F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax}
    | ({F.rms_norm, torch.rms_norm} if on_cuda_fp32_list("rms_norm.default") else set())
)
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves fp64 (and fp8) alone
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class DeviceKernels(TorchFunctionMode):
    """What the real device does that meta tensors do not: fused attention, and autocast to
    `autocast` (None: no autocast); `cuda`: CUDA autocast's fp32 list too (a GPU's; a CPU's
    autocast has none)."""

    def __init__(self, autocast: torch.dtype | None, cuda: bool = False):
        super().__init__()
        self.autocast, self.cuda = autocast, cuda
        self._cache: dict[tuple[int, bool], torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(**{**dict(zip(_SDPA_ARGS, args)), **kwargs})
        if self.autocast is not None and func in LOW_PRECISION_OPS:
            args, kwargs = tree_map(self._cast, (args, kwargs))
        elif self.autocast is not None and self.cuda and func in CUDA_FP32_FUNCTIONS:
            args, kwargs = tree_map(_to_fp32, (args, kwargs))
        return func(*args, **kwargs)

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        if attn_mask is not None or dropout_p or enable_gqa:
            raise NotImplementedError("the plan emulates unmasked attention without dropout (what Wan runs)")
        if self.autocast is not None:
            query, key, value = (self._cast(t) for t in (query, key, value))
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(query, key, value, 0.0, is_causal, scale=scale)[0]

    def _cast(self, t):
        if not isinstance(t, torch.Tensor) or t.dtype not in _CASTABLE or t.dtype == self.autocast:
            return t
        if not (t.is_leaf and t.requires_grad):
            return t.to(self.autocast)
        # torch caches casts of trainable leaves until autocast exits. The trainer's autocast exits
        # after the forward, so a cast made under no_grad (a block's forward in a custom
        # checkpoint) is never reused by the recompute: keyed by grad mode here.
        key = (id(t), torch.is_grad_enabled())
        if key not in self._cache:
            self._cache[key] = t.to(self.autocast)
        return self._cache[key]

    @contextlib.contextmanager
    def active(self):
        """Enter the mode unless it is already on the stack."""
        with contextlib.nullcontext() if self in _get_current_function_mode_stack() else self:
            yield


def _to_fp32(t):
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16) else t


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages operators create that are still alive, and their peak. A storage is
    counted from the op that made it until it is freed (a weak reference's callback)."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: the op allocated nothing.
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.untyped_storage()._cdata not in inputs:
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage._cdata  # the C++ storage: views of one tensor share it
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self._refs[key] = weakref.ref(storage, partial(self._release, key))
        self.now += self._sizes[key]
        self.peak = max(self.peak, self.now)

    def _release(self, key: int, _ref=None) -> None:
        self.now -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def existing(self, tensors) -> None:
        """Count the release of these tensors' storages (weights made before the step) against the
        step: layerwise fp8 casting swaps a weight's storage for a new one each forward, so the new
        one is counted when it is made and the old one must be taken off when it goes."""
        for t in tensors:
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self._sizes:
                self._sizes[key] = storage.nbytes()
                self._refs[key] = weakref.ref(storage, partial(self._release, key))

    def forget(self, tensor: torch.Tensor) -> None:
        """Stop counting `tensor` (a parameter's gradient: the plan counts it elsewhere)."""
        self._release(tensor.untyped_storage()._cdata)


def _tensors(tree):
    """The tensors in nested tuples, lists and dicts (an op's arguments or results)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


@dataclass(frozen=True)
class StepCount:
    """What one training step of a model with `layers` blocks holds, in bytes, and what each
    further block adds (blocks are identical)."""

    layers: int
    frozen: dict[str, int]
    """Frozen parameters and buffers by dtype name ('bf16', 'fp8', ...)."""
    trainable: int
    """Trainable parameters (elements)."""
    largest_trainable: int
    """Elements of the largest trainable parameter (the CPU AdamW step's temporary)."""
    saved: int
    peak: int
    block_frozen: dict[str, int]
    block_trainable: int
    block_saved: int
    """What a block's forward adds to the saved bytes, and to the bytes alive (`block_kept`)."""
    block_kept: int
    block_frozen_sizes: tuple[int, ...] = ()
    """Bytes of each frozen parameter of a block: what block offload copies to host memory one by one."""
    outer_frozen_sizes: tuple[int, ...] = ()
    """Bytes of each frozen parameter outside the blocks (embedders, head; VACE blocks): with the
    blocks', what an idle Wan2.2 expert parks in host memory."""
    adapters: int = 0
    """Wan2.2-Animate: face adapters in the counted model (the plan's: after blocks 0 and 2 of 4)."""
    adapter_every: int = 0
    """Wan2.2-Animate: the whole model has one after every `adapter_every`-th block (0: none)."""
    adapter: "StepCount | None" = None
    """What one face adapter adds (its frozen bytes, trainable elements, saved and kept bytes, in the
    `block_*` fields)."""
    early_peak: int = 0
    """The most bytes alive before the first block runs: the peak when it is larger than the blocks'
    (Wan2.2-Animate's motion encoder at 512 px over every face frame, beside a small model's blocks).
    It does not grow with the blocks; `peak` is the larger of it and `late_peak`."""
    late_peak: int = 0
    """The most bytes alive from the first block on (the backward's peak, or a recompute's)."""

    def extend(self, layers: int) -> "StepCount":
        """The count of the same model with `layers` blocks (and its face adapters). The peak comes in
        the backward, when everything the forward kept is still alive, so it too grows by what each
        block (and adapter) keeps."""
        k = layers - self.layers
        a = layers // self.adapter_every - self.adapters if self.adapter_every else 0
        late = self.late_peak + k * self.block_kept + a * (self.adapter.block_kept if self.adapter else 0)
        extra = self.adapter or replace(self, block_frozen={}, block_trainable=0, block_saved=0, block_kept=0,
                                        block_frozen_sizes=())
        frozen = {d: self.frozen.get(d, 0) + k * self.block_frozen.get(d, 0) + a * extra.block_frozen.get(d, 0)
                  for d in self.frozen | self.block_frozen | extra.block_frozen}
        return replace(self, layers=layers, frozen=frozen, adapters=self.adapters + a,
                       trainable=self.trainable + k * self.block_trainable + a * extra.block_trainable,
                       saved=self.saved + k * self.block_saved + a * extra.block_saved,
                       late_peak=late, peak=max(self.early_peak, late),
                       outer_frozen_sizes=self.outer_frozen_sizes + extra.block_frozen_sizes * a)


def with_routes(plain: StepCount, routed: dict[float, StepCount], routes: list[tuple[float, int, int]]) -> StepCount:
    """`plain` (a whole model's count) with token routes: a routed block adds what a block inside a
    span adds at its ratio (`routed[ratio]`: blocks 1..3 of a 4-block model routed, read at block 2).

    Saved bytes are a sum over blocks. The peak comes in the backward, at some block's recompute (or
    its backward without checkpointing): alive then are what every block before it keeps and that
    block's working set, so it is the larger of two places: the last unrouted block (the plain
    count's peak, with the routed blocks before it keeping their own amount) and the last block of
    each route (the routed count's peak, moved by the blocks before it: an upper bound when that
    count's own peak came at its unrouted block 0). Against whole routed models counted block by
    block (tests/test_plan.py): saved within 0.1%, peak within 2% (the spans' edges copy an index of
    the tokens); a route that starts at block 0 and ends at the last block is over-counted (1.5x at
    8 blocks of the 1.3B with checkpointing: no block is left for the unrouted place)."""
    kept, saved = [plain.block_kept] * plain.layers, [plain.block_saved] * plain.layers
    for ratio, first, last in routes:
        for j in range(first, last + 1):
            kept[j], saved[j] = routed[ratio].block_kept, routed[ratio].block_saved
    peaks = []
    unrouted = [j for j in range(plain.layers) if not any(a <= j <= b for _, a, b in routes)]
    if unrouted:
        last = max(unrouted)
        peaks.append(plain.late_peak - sum(plain.block_kept for _ in range(last + 1, plain.layers)) -
                     sum(plain.block_kept - kept[j] for j in range(last + 1)))
    for ratio, _, last in routes:
        r = routed[ratio]
        peaks.append(r.late_peak - 3 * r.block_kept + sum(kept[1:last + 1]))
    return replace(plain, saved=plain.saved - sum(plain.block_saved - s for s in saved), late_peak=max(peaks),
                   peak=max(plain.early_peak, *peaks))


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float8_e4m3fn: "fp8",
               torch.float64: "fp64"}


def build_model(recipe, variant, layers: int, load_dtype: torch.dtype, device: str = "meta", face_every: int | None = 2):
    """The recipe's transformer with `layers` blocks (on the meta device: no memory), in the dtypes
    a load in `load_dtype` gives (diffusers keeps `_keep_in_fp32_modules` in fp32), adapted as the
    trainer adapts it. Wan2.2-Animate: a face adapter after every `face_every`-th block (None: as
    the variant has them; 2, the plan's, at 4 blocks: after blocks 0 and 2, the last one without, as
    in the whole model)."""
    from ..models.loading import load_dtypes
    from ..models.variants import transformer_class
    from ..training.model_setup import adapt

    # On the device throughout, so the LoRA layers peft adds are made (and initialised) there too.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        config = dict(variant.transformer, num_layers=layers)
        if variant.vace:  # the VACE blocks that fit in `layers`
            config["vace_layers"] = [i for i in variant.transformer["vace_layers"] if i < layers]
        if variant.animate and face_every:
            config["inject_face_latents_blocks"] = face_every
        model = transformer_class(variant)(**config)
        dtypes = load_dtypes(model, load_dtype)
        for name, p in model.named_parameters():
            p.data = p.data.to(dtypes[name])
        return adapt(model, recipe, variant, load_dtype, route=False)


def count_step(recipe, variant, batch_shapes: dict, load_dtype: torch.dtype, autocast: torch.dtype | None,
               engine_dtype: torch.dtype | None = None, layers: int = 2, device: str = "meta",
               cuda: bool = False, routes: tuple[tuple[float, int, int], ...] = (), face_every: int | None = 2) -> StepCount:
    """Run one training step of the recipe's model with `layers` blocks and count it.

    `batch_shapes`: name -> shape of the collated batch (as `to_device` hands it to the trainer: fp32).
    `engine_dtype`: DeepSpeed's mixed precision casts every fp32/bf16/fp16 parameter to it (fp8
    stays); None without DeepSpeed. What a block adds is read between the ends of the forwards of
    blocks 0 and 1 (block 0 differs from the others: its input needs no gradient), so 2 blocks
    suffice. `device="cpu"` runs the same step for real, with torch's own attention, checkpointing
    and autocast: the reference the meta emulation is tested against. `cuda`: autocast as CUDA's
    (its fp32 list too; on a CPU, models/precision.py's emulation of it).

    `routes`: token routes (ratio, first, last block) installed and routing; what a block adds is then
    read at block 2 (the plan routes blocks 1..3 of 4: block 2 is inside the span).

    Wan2.2-Animate (`face_every`: see `build_model`; the plan counts 4 blocks): what a block adds is
    read from block 1 (after face adapter 0), what an adapter adds from the one after block 2;
    `extend` places the model's own number of them."""
    from ..memory.working_set import shrink_working_set
    from ..models.precision import cuda_autocast_emulated
    from ..models.token_routing import TokenRouter

    model = build_model(recipe, variant, layers, load_dtype, device, face_every)
    if engine_dtype is not None:
        for p in model.parameters():
            if p.dtype in _CASTABLE:
                p.data = p.data.to(engine_dtype)
    if device == "meta":
        kernels, autocasting = DeviceKernels(autocast, cuda), contextlib.nullcontext()
        if recipe.train.gradient_checkpointing:
            model.enable_gradient_checkpointing(_block_checkpoint(model, recipe, kernels))
        # The nested checkpoints (FFN slices, attention layers) recompute under the emulated kernels too.
        shrink_working_set(model, recipe.train, _checkpoint_with(kernels))
    else:
        kernels = cuda_autocast_emulated() if cuda else contextlib.nullcontext()
        autocasting = torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    live = LiveBytes()
    live.existing([*model.parameters(), *model.buffers()])
    for p in trainable:
        p.register_post_accumulate_grad_hook(lambda p: live.forget(p.grad))
    # Warnings are the simulated run's (e.g. torch's note that a bf16 rms_norm over fp32 weights
    # takes the unfused path): the real run says them where they matter.
    routing, at = contextlib.nullcontext(), 1
    if routes:
        router, at = TokenRouter(list(routes)), 2
        router.install(model)
        routing = router.routing(0)
    # Animate's face video is collated as the 8-bit frames prep stored.
    batch = {k: torch.zeros(s, device=device, dtype=torch.uint8 if k == "face" else None) for k, s in batch_shapes.items()}
    early: list[int] = []  # the peak before block 0, then counting starts again from what is alive

    def first_block(_module, _args):
        if not early and torch._C._current_graph_task_id() == -1:
            early.append(live.peak)
            live.peak = live.now

    start = model.blocks[0].register_forward_pre_hook(first_block)
    with kernels, autocasting, live, routing, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved, ends = _step(model, variant, batch, live)
    start.remove()
    block = model.blocks[1]
    adapter = None
    if variant.animate and face_every == 2 and layers == 4:  # face adapters after blocks 0 and 2
        # Block 2 follows block 1 alone; block 3 follows face adapter 1 (and the sum of its output
        # with the stream): what it adds beyond a block is the adapter's.
        block_adds = [b - a for a, b in zip(ends[1], ends[2])]
        adapter = _part_count(model.face_adapter[1], [b - a - d for a, b, d in zip(ends[2], ends[3], block_adds)])
        ends, at = ends[1:], 1
    # VACE: the model built has a VACE block beside its `layers` blocks; it counts as one more.
    return StepCount(layers + len(getattr(model.config, "vace_layers", None) or ()), _frozen_bytes(model), sum(p.numel() for p in trainable),
                     max((p.numel() for p in trainable), default=0), saved, max(live.peak, *early), _frozen_bytes(block),
                     sum(p.numel() for p in block.parameters() if p.requires_grad),
                     ends[at][0] - ends[at - 1][0], ends[at][1] - ends[at - 1][1], _frozen_sizes(block.parameters()),
                     _frozen_sizes(p for n, p in model.named_parameters() if not n.startswith("blocks.")),
                     adapters=len(getattr(model, "face_adapter", ())),
                     adapter_every=variant.transformer["inject_face_latents_blocks"] if variant.animate else 0,
                     adapter=adapter, early_peak=early[0] if early else live.peak, late_peak=live.peak if early else 0)


def _part_count(module, adds: list[int]) -> StepCount:
    """What `module` (a face adapter) adds: its weights, and `adds` (saved, alive bytes), in a
    StepCount's `block_*` fields."""
    return StepCount(0, {}, 0, 0, 0, 0, _frozen_bytes(module), sum(p.numel() for p in module.parameters() if p.requires_grad),
                     adds[0], adds[1], _frozen_sizes(module.parameters()))


def _frozen_sizes(params) -> tuple[int, ...]:
    return tuple(p.numel() * p.element_size() for p in params if not p.requires_grad)


def _frozen_bytes(module) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in [*(p for p in module.parameters() if not p.requires_grad), *module.buffers()]:
        name = DTYPE_NAMES.get(t.dtype, str(t.dtype))
        out[name] = out.get(name, 0) + t.numel() * t.element_size()
    return out


def _step(model, variant, batch: dict, live: LiveBytes) -> tuple[int, list[tuple[int, int]]]:
    """Forward, loss and backward as the trainer runs them. Returns the bytes autograd saved for the
    backward (unique storages, parameters excluded), and (saved, alive) bytes at the end of each
    block's forward."""
    from ..training import flow_matching as fm

    latents = batch["latents"]
    noise, sigmas = torch.zeros_like(latents), torch.zeros(latents.shape[0], device=latents.device)
    saved: dict[int, torch.UntypedStorage] = {}  # held: no storage (and so no key) is reused meanwhile
    ends: list[tuple[int, int]] = []  # (storages saved so far, bytes alive)

    def pack(t):
        saved.setdefault(t.untyped_storage()._cdata, t.untyped_storage())
        return t

    def block_done(_module, _args, _out):
        if torch._C._current_graph_task_id() == -1:  # the forward, not a recompute in the backward
            ends.append((len(saved), live.now))

    hooks, checkpointed = [], model.gradient_checkpointing
    if checkpointed:
        # After the checkpoint function returns: a custom autograd Function (BlockCheckpoint)
        # saves the block's input and arguments when its forward returns, after the block's own
        # forward hooks ran.
        main = {id(b) for b in model.blocks}  # VACE's blocks run first, through the same function

        def after(block, *args):
            out = checkpoint(block, *args)
            if id(block) in main:
                block_done(block, args, out)
            return out

        checkpoint, model._gradient_checkpointing_func = model._gradient_checkpointing_func, after
    else:
        hooks = [b.register_forward_hook(block_done) for b in model.blocks]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pred, target = fm.predict(model, variant, batch, sigmas, noise, model.dtype)
        loss = fm.flow_matching_loss(pred, target, torch.ones_like(sigmas))
    for h in hooks:
        h.remove()
    if checkpointed:
        model._gradient_checkpointing_func = checkpoint
    # Weights are not activations; a weight's storage is known once the forward is over (fp8
    # casting swaps it during the forward, and its upcast copies that autograd keeps do count).
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    sizes = [0 if k in weights else s.nbytes() for k, s in saved.items()]
    ends = [(sum(sizes[:n]), alive) for n, alive in ends]
    saved.clear()
    loss.backward()  # pred and target stay alive through it, as in the trainer's loop
    return sum(sizes), ends


def _block_checkpoint(model, recipe, kernels: DeviceKernels):
    """The trainer's block checkpoint (memory/activation_offload.py: block_checkpoint) with the
    emulated kernels entered around each block, or diffusers' default. The plan counts activation
    offload from what stays on the device (plan/memory.py), so its blocks are counted as kept here."""
    from ..memory.activation_offload import BlockCheckpoint

    if recipe.train.attention_checkpointing:

        def run(block, *args):
            with kernels.active():
                return block(*args)

        return BlockCheckpoint(model, None, run)
    return _checkpoint_with(kernels)


def _checkpoint_with(kernels: DeviceKernels):
    """diffusers' default gradient-checkpointing function, with `kernels` entered around the block
    both in the forward and in the backward's recompute (`context_fn`: selective checkpointing, as
    memory/working_set.py passes it)."""

    def checkpointed(block, *args, context_fn=None):
        def run(*inputs):
            with kernels.active():
                return block(*inputs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False,
                                                 context_fn=context_fn or torch.utils.checkpoint.noop_context_fn)

    return checkpointed


def with_train(recipe, **changes):
    """A copy of the recipe with `train` settings changed (the probe's variations)."""
    return replace(recipe, train=replace(recipe.train, **changes))
