"""Token routing for training (TREAD, Krause et al. 2025): a random share of a clip's tokens skips a
contiguous span of blocks and rejoins after it, so those blocks run on fewer tokens.

How it runs inside diffusers' Wan transformer without touching its loop: the routed blocks' `forward`
is patched on the instance (module names, LoRA keys and checkpoints do not change). While a step
routes, the span's first block reorders the tokens (kept first, routed after), each block of the span
computes on the kept ones with their own rotary positions (and per-token timestep embeddings, Wan2.2
TI2V) and passes the routed ones through untouched, and the span's last block puts every token back
in its place. The routed tokens travel in the tensor itself, not beside it, so gradient checkpointing
(whose recompute calls the block again), activation offload, block offload, FFN chunks, attention
checkpoints, fp8 storage and DDP / ZeRO / FSDP2 see an ordinary block call.

Several routes (`train.routes`, a progressive schedule) are spans that do not overlap, each with its
own ratio and its own draw: a token routed past one span runs through the blocks between spans and may
be kept by the next.

Which tokens are kept comes from a seed the trainer sets per micro-batch (`routing(seed)`): the same
on a resume, drawn again for each length of sequence (a bucket's) and each route, and nothing else's
random draws change. Outside `routing` (held-out scores, validation renders, inference) the blocks run
as before.
"""

from __future__ import annotations

import contextlib

import torch


def routed_span(num_layers: int, start: int, end: int) -> tuple[int, int]:
    """(first, last) block of the span, negatives counted from the end; ValueError naming the keys."""
    first, last = start % num_layers if start < 0 else start, end % num_layers if end < 0 else end
    if not (0 <= first < num_layers and 0 <= last < num_layers) or start < -num_layers or end < -num_layers:
        raise ValueError(f"route_start={start}, route_end={end}: the model has {num_layers} blocks "
                         f"(0..{num_layers - 1}, or -{num_layers}..-1 from the end)")
    if first > last:
        raise ValueError(f"route_start={start} (block {first}) comes after route_end={end} (block {last}): "
                         "the span runs from the first to the last routed block")
    return first, last


def route_spans(num_layers: int, train) -> list[tuple[float, int, int]]:
    """(ratio, first, last block) of each of the recipe's routes, in block order: `train.routes`, or the
    shorthand `route_ratio` / `route_start` / `route_end` ([] when neither is set). ValueError naming
    the key when a span is not in the model, or two overlap."""
    if train.route_ratio and train.routes:
        raise ValueError("train.route_ratio and train.routes both set: give one route by route_ratio, or several "
                         "by routes (set route_ratio=0)")
    given = [(r.ratio, r.start, r.end, f"train.routes[{i}]") for i, r in enumerate(train.routes)]
    if train.route_ratio:
        given = [(train.route_ratio, train.route_start, train.route_end, "train.route_start")]
    spans = []
    for ratio, start, end, key in given:
        try:
            spans.append((ratio, *routed_span(num_layers, start, end)))
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
    for (_, a0, a1), (_, b0, b1) in zip(spans, spans[1:]):
        if b0 <= a1:
            raise ValueError(f"train.routes: blocks {a0}..{a1} and {b0}..{b1} overlap or are out of order; give "
                             "the routes in block order, each starting after the last one ends")
    return spans


def kept_tokens(tokens: int, ratio: float) -> int:
    """Tokens that run through the routed span (at least one)."""
    return max(1, tokens - round(ratio * tokens))


class TokenRouter:
    """The routing of one transformer: install once, then `routing(seed)` around each micro-batch's
    forward and backward. `routes`: (ratio, first, last block) of each span, in block order."""

    def __init__(self, routes: list[tuple[float, int, int]]):
        self.routes = routes
        self.seed: int | None = None
        self._orders: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @contextlib.contextmanager
    def routing(self, seed: int):
        """Route the blocks' calls (forward and the backward's recomputes) with this seed's draw."""
        self.seed, self._orders = seed, {}
        try:
            yield
        finally:
            self.seed, self._orders = None, {}

    @torch.compiler.disable
    def order(self, tokens: int, device: torch.device, route: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation, its inverse) of `tokens` positions for route `route`: kept tokens first. One
        draw per seed, length and route (route 0's seed is the micro-batch's own). Outside
        train.compile's graphs (a seeded CPU generator cannot be traced): the block's graph calls it
        and goes on with its indices, and a new seed recompiles nothing."""
        key = (route, tokens, str(device))
        if key not in self._orders:
            g = torch.Generator().manual_seed((self.seed + route * 0x9E3779B97F4A7C15) % 2**63)
            perm = torch.randperm(tokens, generator=g)
            kept = kept_tokens(tokens, self.routes[route][0])
            perm = torch.cat([perm[:kept].sort().values, perm[kept:].sort().values])  # kept in their own order
            self._orders[key] = (perm.to(device), torch.argsort(perm).to(device))
        return self._orders[key]

    def install(self, model) -> None:
        for route, (_, first, last) in enumerate(self.routes):
            for j in range(first, last + 1):
                block = model.blocks[j]
                whole = getattr(block, "_unrouted_forward", block.forward)
                block._unrouted_forward = whole
                block.forward = self._forward(whole, route, j == first, j == last)

    def _forward(self, whole, route: int, first: bool, last: bool):
        ratio = self.routes[route][0]

        def forward(hidden_states: torch.Tensor, encoder_hidden_states, temb, rotary_emb, *args, **kwargs):
            if self.seed is None:
                return whole(hidden_states, encoder_hidden_states, temb, rotary_emb, *args, **kwargs)
            tokens = hidden_states.shape[1]
            perm, inverse = self.order(tokens, hidden_states.device, route)
            if first:
                hidden_states = hidden_states[:, perm]
            kept = kept_tokens(tokens, ratio)
            index = perm[:kept]
            rope = tuple(r[:, index] for r in rotary_emb) if isinstance(rotary_emb, tuple) else rotary_emb[:, index]
            temb = temb[:, index] if temb.ndim == 4 else temb  # Wan2.2 TI2V: a timestep embedding per token
            out = whole(hidden_states[:, :kept], encoder_hidden_states, temb, rope, *args, **kwargs)
            out = torch.cat([out, hidden_states[:, kept:]], dim=1)
            return out[:, inverse] if last else out

        return forward


def make_router(model, train) -> TokenRouter | None:
    """The recipe's router installed on `model` (None without routes)."""
    spans = route_spans(len(model.blocks), train)
    if not spans:
        return None
    router = TokenRouter(spans)
    router.install(model)
    return router
