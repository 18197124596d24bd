"""The stock ComfyUI nodes the exported workflows use, as ComfyUI defines them: class name ->
(required inputs, optional inputs, output types), each input with its type (COMBO and the
primitives are widgets; the others are links). Taken from ComfyUI's node definitions: nodes.py
(loaders, CLIPTextEncode, KSampler(Advanced), VAEDecode, LoadImage, CLIPVision*, ImageToMask via
comfy_extras/nodes_mask.py), comfy_extras/nodes_wan.py (WanImageToVideo, WanFirstLastFrameToVideo,
WanVaceToVideo, TrimVideoLatent, Wan22ImageToVideoLatent), nodes_hunyuan.py
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
