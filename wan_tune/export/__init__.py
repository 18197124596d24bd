"""Export: adapters in ComfyUI / diffusers / kohya formats, full-model export, self-test."""
