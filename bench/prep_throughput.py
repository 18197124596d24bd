"""Prep throughput: decode+resize clips/s, encode clips/s, and decord's batched fetch vs naive
frame-by-frame loops (goal: >= 3x), all measured in this one command.

    python bench/prep_throughput.py                      # tiny VAE, 33-frame windows, 240x416
    python bench/prep_throughput.py --vae real --size 480x832 --frames 81 --clips 4

Sources are `--seconds` long at 24 fps (footage is longer than one window); each yields one
window of `--frames` at 16 fps starting `--start` seconds in. Two naive references:
  - decord `vr[i]` per frame (random access, one Python call and one conversion per frame);
  - a PyAV decode loop converting every decoded frame to RGB and keeping the window's frames
    (what a simple script does), stopping after the window's last frame.

`--vae real` builds the real Wan2.1 VAE architecture (random weights: speed does not depend on
them); the text encoder is the tiny one either way (captions are encoded once per clip).
Runs alternate A/B/A/B so drift on a noisy machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--frames", type=int, default=33, help="frames per training window (4k+1)")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each source clip")
    ap.add_argument("--start", type=float, default=2.0, help="where the window starts in the source")
    ap.add_argument("--size", default="240x416", help="bucket HxW; sources are 1.25x larger, at 24 fps")
    ap.add_argument("--vae", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    h, w = (int(x) for x in args.size.split("x"))
    torch.manual_seed(0)

    from data_prep.buckets import resize_crop
    from data_prep.encode import normalize_latents
    from data_prep.video import plan_windows
    from wan_tune.media.footage import probe, read_frames
    from wan_tune.media.synthetic import moving_shape, write_video

    tmp = Path(tempfile.mkdtemp(prefix="bench-prep-"))
    src_frames = int(args.seconds * 24)
    sh, sw = (int(h * 1.25) // 2 * 2, int(w * 1.25) // 2 * 2)
    print(f"writing {args.clips} source clips: {src_frames} frames {sw}x{sh} @ 24 fps ...", flush=True)
    paths = [str(write_video(tmp / f"c{i}.mp4", moving_shape(src_frames, sh, sw, seed=i), fps=24)) for i in range(args.clips)]
    windows = [plan_windows(probe(p, False), 16, [args.frames], 0, 1, start_s=args.start)[0] for p in paths]

    import decord

    def batched():
        for p, win in zip(paths, windows):
            decord.VideoReader(p, ctx=decord.cpu(0), num_threads=1).get_batch(list(win.indices)).asnumpy()

    def naive():
        for p, win in zip(paths, windows):
            vr = decord.VideoReader(p, ctx=decord.cpu(0), num_threads=1)
            [vr[i].asnumpy() for i in win.indices]

    def pyav_loop():
        import av

        for p, win in zip(paths, windows):
            wanted, last, kept = set(win.indices), max(win.indices), []
            with av.open(p) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    rgb = frame.to_ndarray(format="rgb24")
                    if i in wanted:
                        kept.append(rgb)
                    if i >= last:
                        break

    batch_t, naive_t, pyav_t = [], [], []
    for _ in range(args.repeats):  # alternate: A B C A B C ...
        batch_t += timed(batched, 1)
        naive_t += timed(naive, 1)
        pyav_t += timed(pyav_loop, 1)

    def decode_resize():
        return [resize_crop(read_frames(p, win, False), (h, w)) for p, win in zip(paths, windows)]

    dr_t = timed(decode_resize, args.repeats)
    videos = decode_resize()

    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan() if args.vae == "real" else AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    vae.eval().requires_grad_(False)

    @torch.no_grad()
    def encode():
        for v in videos:
            normalize_latents(vae.encode(v[None]).latent_dist.mode(), vae)

    enc_t = timed(encode, max(1, args.repeats if args.vae == "tiny" else 1))

    med = statistics.median
    n = args.clips
    rows = [
        ("decord get_batch (window of %d)" % args.frames, n / med(batch_t), "reference"),
        ("naive: decord vr[i] per frame", n / med(naive_t), f"batch is {med(naive_t) / med(batch_t):.2f}x faster"),
        ("naive: PyAV decode loop, every frame to RGB", n / med(pyav_t), f"batch is {med(pyav_t) / med(batch_t):.2f}x faster"),
        ("decode + resize/crop to %dx%d" % (h, w), n / med(dr_t), ""),
        (f"VAE encode ({args.vae} VAE, fp32, {torch.get_num_threads()} threads)", n / med(enc_t), ""),
    ]
    print(f"\nprep throughput ({n} clips, {args.frames} frames, bucket {h}x{w}, median of {args.repeats})")
    print(f"  {'stage':<48}{'clips/s':>10}  ratio")
    for name, rate, ratio in rows:
        print(f"  {name:<48}{rate:>10.2f}  {ratio}")
    for name, ref in (("decord vr[i]", naive_t), ("PyAV loop", pyav_t)):
        speedup = med(ref) / med(batch_t)
        print(f"\n  batched vs {name}: {speedup:.2f}x (goal >= 3x: {'met' if speedup >= 3 else 'NOT met'})", end="")
    print()
    print(f"  encode share of decode+resize+encode time: {med(enc_t) / (med(enc_t) + med(dr_t)):.0%}")


if __name__ == "__main__":
    main()
