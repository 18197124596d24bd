"""Matmul FLOPs of a training step (what MFU divides by; bench/step_throughput.py uses it too)."""

from __future__ import annotations

import torch

# Wan2.2-Animate's modules that read the face video's frames, not the tokens: the motion encoder (counted
# per frame, `motion_encoder_flops`), the face encoder and each face adapter's keys and values (over a
# few motion tokens per latent frame: negligible). A face adapter's queries and output run on the tokens.
FACE_SIDE = ("motion_encoder.", "face_encoder.")


def step_flops(model, tokens: int, full: bool, text_tokens: int = 512,
               routing: list[tuple[float, int, int]] = (), face_frames: int = 0) -> float:
    """Matmul FLOPs of one step. Linears that read the text (the text embedder, cross-attention
    k/v, and the I2V image k/v, counted at the text length) run on `text_tokens`, the rest on the
    video tokens; attention adds 4*S*S*D (self) and 4*S*T*D (cross) per block. A LoRA step is ~2x
    the forward (backward to activations only; frozen weights get no gradient), full fine-tuning ~3x.
    `routing`: (ratio, first, last block) of each token route, whose span runs on its kept tokens.
    `face_frames`: Wan2.2-Animate's face video frames, each through the motion encoder's convolutions."""
    cfg = model.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    text_side = ("text_embedder", "attn2.to_k", "attn2.to_v", "attn2.add_k_proj", "attn2.add_v_proj")
    video = text = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith(("lora_A.default", "lora_B.default")):
            if "time_embedder" in name or "time_proj" in name or "image_embedder" in name:
                continue  # once per sample (or per image): negligible
            if name.startswith(FACE_SIDE) or (name.startswith("face_adapter.") and name.endswith((".to_k", ".to_v"))):
                continue
            if any(t in name for t in text_side):
                text += m.in_features * m.out_features
            else:
                video += m.in_features * m.out_features
    layers = cfg.num_layers + len(getattr(cfg, "vace_layers", None) or ())  # VACE blocks attend like the others
    forward = 2 * (video * tokens + text * text_tokens) + layers * (4 * tokens**2 * dim + 4 * tokens * text_tokens * dim)
    for route in routing:
        forward -= routed_saving(model, tokens, text_tokens, text_side, *route)
    # The motion encoder: frozen in a LoRA run and fed no gradient (the forward only); trained when full.
    face = face_frames * motion_encoder_flops(model) if face_frames else 0.0
    return (3 if full else 2) * forward + (3 if full else 1) * face + materialised_update_flops(model, tokens, text_tokens, text_side)


def motion_encoder_flops(model) -> float:
    """FLOPs of Wan2.2-Animate's motion encoder on one face frame (its convolutions at the encoder's
    square, counted by torch's FlopCounterMode on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.config.motion_encoder_size
    with FlopCounterMode(display=False) as counter:
        model.motion_encoder(torch.zeros(1, 3, size, size, device="meta"))
    return float(counter.get_total_flops())


def routed_saving(model, tokens: int, text_tokens: int, text_side, ratio: float, first: int, last: int) -> float:
    """Forward FLOPs the routed blocks do not do: their video-side projections, self-attention and
    cross-attention queries on the routed tokens (the text-side k/v projections run as before)."""
    from ..models.token_routing import kept_tokens

    dim = model.config.num_attention_heads * model.config.attention_head_dim
    kept, saved = kept_tokens(tokens, ratio), 0.0
    for j in range(first, last + 1):
        video = sum(m.in_features * m.out_features for name, m in model.blocks[j].named_modules()
                    if isinstance(m, torch.nn.Linear) and not name.endswith(("lora_A.default", "lora_B.default"))
                    and not any(t in name for t in text_side))
        saved += 2 * video * (tokens - kept) + 4 * (tokens**2 - kept**2) * dim + 4 * (tokens - kept) * text_tokens * dim
    return saved


def materialised_update_flops(model, tokens: int, text_tokens: int, text_side) -> float:
    """LoHa / LoKr (peft) build each adapted layer's whole update and apply it as a second matmul
    of the layer's size: three more of them a step (the forward, the gradient of its input, the
    gradient of the update). Building the update itself is small beside them (rank-sized products)."""
    extra = 0
    for name, m in model.named_modules():
        if hasattr(m, "hada_w1_a") or hasattr(m, "lokr_w1"):
            base = m.get_base_layer()
            n = text_tokens if any(t in name for t in text_side) else tokens
            extra += 3 * 2 * base.in_features * base.out_features * n
    return float(extra)
