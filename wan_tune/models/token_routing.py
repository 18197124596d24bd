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

Which tokens are kept comes from a seed the trainer sets per micro-batch (`routing(seed)`): the same
on a resume, drawn again for each length of sequence (a bucket's), and nothing else's random draws
change. Outside `routing` (held-out scores, validation renders, inference) the blocks run as before.
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


def kept_tokens(tokens: int, ratio: float) -> int:
    """Tokens that run through the routed span (at least one)."""
    return max(1, tokens - round(ratio * tokens))


class TokenRouter:
    """The routing of one transformer: install once, then `routing(seed)` around each micro-batch's
    forward and backward."""

    def __init__(self, ratio: float, first: int, last: int):
        self.ratio, self.first, self.last = ratio, first, last
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

    def order(self, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation, its inverse) of `tokens` positions: kept tokens first. One draw per seed and length."""
        key = (self.seed, tokens, str(device))
        if key not in self._orders:
            g = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(tokens, generator=g)
            kept = kept_tokens(tokens, self.ratio)
            perm = torch.cat([perm[:kept].sort().values, perm[kept:].sort().values])  # kept in their own order
            self._orders[key] = (perm.to(device), torch.argsort(perm).to(device))
        return self._orders[key]

    def install(self, model) -> None:
        for j in range(self.first, self.last + 1):
            block = model.blocks[j]
            whole = getattr(block, "_unrouted_forward", block.forward)
            block._unrouted_forward = whole
            block.forward = self._forward(whole, j)

    def _forward(self, whole, j: int):
        def forward(hidden_states: torch.Tensor, encoder_hidden_states, temb, rotary_emb, *args, **kwargs):
            if self.seed is None:
                return whole(hidden_states, encoder_hidden_states, temb, rotary_emb, *args, **kwargs)
            tokens = hidden_states.shape[1]
            perm, inverse = self.order(tokens, hidden_states.device)
            if j == self.first:
                hidden_states = hidden_states[:, perm]
            kept = kept_tokens(tokens, self.ratio)
            index = perm[:kept]
            rope = tuple(r[:, index] for r in rotary_emb) if isinstance(rotary_emb, tuple) else rotary_emb[:, index]
            temb = temb[:, index] if temb.ndim == 4 else temb  # Wan2.2 TI2V: a timestep embedding per token
            out = whole(hidden_states[:, :kept], encoder_hidden_states, temb, rope, *args, **kwargs)
            out = torch.cat([out, hidden_states[:, kept:]], dim=1)
            return out[:, inverse] if j == self.last else out

        return forward


def make_router(model, train) -> TokenRouter | None:
    """The recipe's router installed on `model` (None when train.route_ratio is 0)."""
    if not train.route_ratio:
        return None
    first, last = routed_span(len(model.blocks), train.route_start, train.route_end)
    router = TokenRouter(train.route_ratio, first, last)
    router.install(model)
    return router
