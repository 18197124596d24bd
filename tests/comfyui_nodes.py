"""The stock ComfyUI nodes the exported workflows use, as ComfyUI defines them: class name ->
(required inputs, optional inputs, output types), each input with its type (COMBO and the
primitives are widgets; the others are links). Taken from ComfyUI's node definitions: nodes.py
(loaders, CLIPTextEncode, KSampler(Advanced), VAEDecode, LoadImage, CLIPVision*, ImageToMask via
comfy_extras/nodes_mask.py), comfy_extras/nodes_wan.py (WanImageToVideo, WanFirstLastFrameToVideo,
WanVaceToVideo, WanAnimateToVideo, TrimVideoLatent,
Wan22ImageToVideoLatent), nodes_hunyuan.py
(EmptyHunyuanLatentVideo), nodes_model_advanced.py (ModelSamplingSD3), nodes_video.py (LoadVideo,
GetVideoComponents), nodes_images.py (SaveAnimatedWEBP). Combo inputs list the values the workflows
may use."""

C, L, I, F = "CONDITIONING", "LATENT", "INT", "FLOAT"
SIZE = {"width": I, "height": I, "length": I, "batch_size": I}
SAMPLING = {"cfg": F, "sampler_name": "COMBO", "scheduler": "COMBO", "positive": C, "negative": C, "latent_image": L}

NODES = {
    "UNETLoader": ({"unet_name": "COMBO", "weight_dtype": "COMBO"}, {}, ("MODEL",)),
    "CLIPLoader": ({"clip_name": "COMBO", "type": "COMBO"}, {"device": "COMBO"}, ("CLIP",)),
    "VAELoader": ({"vae_name": "COMBO"}, {}, ("VAE",)),
    "LoraLoaderModelOnly": ({"model": "MODEL", "lora_name": "COMBO", "strength_model": F}, {}, ("MODEL",)),
    "CLIPTextEncode": ({"text": "STRING", "clip": "CLIP"}, {}, (C,)),
    "ModelSamplingSD3": ({"model": "MODEL", "shift": F}, {}, ("MODEL",)),
    "EmptyHunyuanLatentVideo": (dict(SIZE), {}, (L,)),
    "Wan22ImageToVideoLatent": ({"vae": "VAE", **SIZE}, {"start_image": "IMAGE"}, (L,)),
    "KSampler": ({"model": "MODEL", "seed": I, "steps": I, "denoise": F, **SAMPLING}, {}, (L,)),
    "KSamplerAdvanced": ({"model": "MODEL", "add_noise": "COMBO", "noise_seed": I, "steps": I, "start_at_step": I,
                          "end_at_step": I, "return_with_leftover_noise": "COMBO", **SAMPLING}, {}, (L,)),
    "VAEDecode": ({"samples": L, "vae": "VAE"}, {}, ("IMAGE",)),
    "SaveAnimatedWEBP": ({"images": "IMAGE", "filename_prefix": "STRING", "fps": F, "lossless": "BOOLEAN", "quality": I,
                          "method": "COMBO"}, {}, ()),
    "LoadImage": ({"image": "COMBO"}, {}, ("IMAGE", "MASK")),
    "CLIPVisionLoader": ({"clip_name": "COMBO"}, {}, ("CLIP_VISION",)),
    "CLIPVisionEncode": ({"clip_vision": "CLIP_VISION", "image": "IMAGE", "crop": "COMBO"}, {}, ("CLIP_VISION_OUTPUT",)),
    "WanImageToVideo": ({"positive": C, "negative": C, "vae": "VAE", **SIZE},
                        {"clip_vision_output": "CLIP_VISION_OUTPUT", "start_image": "IMAGE"}, (C, C, L)),
    "WanFirstLastFrameToVideo": ({"positive": C, "negative": C, "vae": "VAE", **SIZE},
                                 {"clip_vision_start_image": "CLIP_VISION_OUTPUT", "clip_vision_end_image": "CLIP_VISION_OUTPUT",
                                  "start_image": "IMAGE", "end_image": "IMAGE"}, (C, C, L)),
    "WanVaceToVideo": ({"positive": C, "negative": C, "vae": "VAE", **SIZE, "strength": F},
                       {"control_video": "IMAGE", "control_masks": "MASK", "reference_image": "IMAGE"}, (C, C, L, I)),
    "WanAnimateToVideo": ({"positive": C, "negative": C, "vae": "VAE", **SIZE, "continue_motion_max_frames": I,
                           "video_frame_offset": I},
                          {"clip_vision_output": "CLIP_VISION_OUTPUT", "reference_image": "IMAGE", "face_video": "IMAGE",
                           "pose_video": "IMAGE", "background_video": "IMAGE", "character_mask": "MASK",
                           "continue_motion": "IMAGE"}, (C, C, L, I, I, I)),
    "TrimVideoLatent": ({"samples": L, "trim_amount": I}, {}, (L,)),
    "LoadVideo": ({"file": "COMBO"}, {}, ("VIDEO",)),
    "GetVideoComponents": ({"video": "VIDEO"}, {}, ("IMAGE", "AUDIO", F)),
    "ImageToMask": ({"image": "IMAGE", "channel": "COMBO"}, {}, ("MASK",)),
}
WIDGETS = {"COMBO", "STRING", I, F, "BOOLEAN"}
COMBO_VALUES = {
    ("CLIPLoader", "type"): {"wan"}, ("CLIPLoader", "device"): {"default", "cpu"},
    ("UNETLoader", "weight_dtype"): {"default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"},
    ("KSampler", "sampler_name"): {"uni_pc", "euler"}, ("KSampler", "scheduler"): {"simple"},
    ("KSamplerAdvanced", "sampler_name"): {"uni_pc", "euler"}, ("KSamplerAdvanced", "scheduler"): {"simple"},
    ("KSamplerAdvanced", "add_noise"): {"enable", "disable"},
    ("KSamplerAdvanced", "return_with_leftover_noise"): {"enable", "disable"},
    ("SaveAnimatedWEBP", "method"): {"default", "fastest", "slowest"},
    ("CLIPVisionEncode", "crop"): {"center", "none"}, ("ImageToMask", "channel"): {"red", "green", "blue", "alpha"},
}
OUTPUT_NODES = {"SaveAnimatedWEBP"}


def check_graph(graph: dict) -> list[str]:
    """Every way the graph could fail to load or run in stock ComfyUI, as messages (none: it links up)."""
    problems = []
    for node_id, node in graph.items():
        cls = node["class_type"]
        if cls not in NODES:
            problems.append(f"{node_id}: {cls} is not a stock ComfyUI node")
            continue
        required, optional, _ = NODES[cls]
        inputs = node["inputs"]
        problems += [f"{node_id} {cls}: required input {k} missing" for k in required if k not in inputs]
        problems += [f"{node_id} {cls}: {k} is not an input of {cls}" for k in inputs if k not in {**required, **optional}]
        for key, value in inputs.items():
            kind = {**required, **optional}.get(key)
            if isinstance(value, list):  # a link [node id, output index]
                source = graph.get(value[0])
                outputs = NODES.get(source["class_type"], ({}, {}, ()))[2] if source else ()
                if source is None or not 0 <= value[1] < len(outputs):
                    problems.append(f"{node_id} {cls}.{key}: links to a missing node or output {value}")
                elif outputs[value[1]] != kind:
                    problems.append(f"{node_id} {cls}.{key}: takes {kind}, linked to a {outputs[value[1]]}")
            elif kind not in WIDGETS:
                problems.append(f"{node_id} {cls}.{key}: {kind} must be linked, got the value {value!r}")
            elif (cls, key) in COMBO_VALUES and value not in COMBO_VALUES[(cls, key)]:
                problems.append(f"{node_id} {cls}.{key}: {value!r} is not one of its options")
    # Every node feeds the saved video (nothing dangling), and there is exactly one output node.
    outputs = [n for n, node in graph.items() if node["class_type"] in OUTPUT_NODES]
    if len(outputs) != 1:
        problems.append(f"{len(outputs)} output nodes")
    reached, todo = set(), list(outputs)
    while todo:
        n = todo.pop()
        if n not in reached:
            reached.add(n)
            todo += [v[0] for v in graph[n]["inputs"].values() if isinstance(v, list)]
    problems += [f"{n} {graph[n]['class_type']} feeds nothing" for n in graph if n not in reached]
    return problems
