"""Footage in and out: reading clips and stills (decord, PyAV) into frame windows (`footage`),
writing videos (`video_io`), VACE conditioning inputs (`vace_inputs`: references, controls, masks as
sidecars or manifest columns; `vace_media`: as validation and the pipelines feed them) and the
synthetic clips of the tests and the demo (`synthetic`). Both prep and training read through here,
so training never imports `data_prep`."""
