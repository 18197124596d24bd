"""Flow-matching pure functions and the bucket batch sampler."""

from __future__ import annotations

import itertools

import pytest
import torch

from wan_tune.data.dataset import collate, to_device
from wan_tune.data.sampler import BucketBatchSampler
from wan_tune.models.spec import timesteps_for
from wan_tune.training import flow_matching as fm


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_noising_and_target_follow_the_wan_convention():
    x0, noise = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    sigmas = torch.tensor([0.0, 1.0])
    xt = fm.noisy_latents(x0, noise, sigmas)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    assert torch.equal(fm.velocity_target(x0, noise), noise - x0)
    assert torch.equal(timesteps_for(torch.tensor([0.25])), torch.tensor([250.0]))


def test_shift_formula_and_scheme_shapes():
    s = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(fm.shift_sigmas(s, 3.0), 3 * s / (1 + 2 * s))
    n = 20000
    uniform = fm.sample_sigmas(n, "uniform", gen())
    shifted = fm.sample_sigmas(n, "shift", gen(), shift=3.0)
    logit = fm.sample_sigmas(n, "logit_normal", gen(), logit_mean=0.0, logit_std=1.0)
    assert abs(uniform.mean() - 0.5) < 0.01
    assert shifted.mean() > 0.6  # shift > 1 moves mass to high noise
    assert abs(logit.median() - 0.5) < 0.02 and logit.std() < uniform.std()  # concentrated mid-range
    ranged = fm.sample_sigmas(n, "logit_normal", gen(), sigma_min=0.875, sigma_max=1.0)
    assert ranged.min() >= 0.875 and ranged.max() <= 1.0
    assert torch.equal(fm.sample_sigmas(5, "sigmoid", gen(3)), fm.sample_sigmas(5, "sigmoid", gen(3)))  # seeded
    with pytest.raises(ValueError, match="unknown"):
        fm.sample_sigmas(1, "cubic", gen())


def test_loss_weights_keep_mean_one_and_loss_is_weighted():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    for scheme in ("none", "sigma_sqrt", "cosmap"):
        assert fm.loss_weights(sigmas, scheme).mean().item() == pytest.approx(1.0)
    pred, target = torch.zeros(2, 4), torch.stack([torch.ones(4), 2 * torch.ones(4)])
    assert fm.flow_matching_loss(pred, target, torch.tensor([1.0, 1.0])).item() == pytest.approx(2.5)
    assert fm.flow_matching_loss(pred, target, torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)


BUCKETS = [(9, 64, 96)] * 7 + [(9, 96, 64)] * 5 + [(1, 64, 96)] * 2


def test_batches_hold_one_bucket_and_ranks_never_share_samples():
    ranks = [BucketBatchSampler(BUCKETS, 2, seed=1, rank=r, world=2) for r in range(2)]
    per_rank = [r.epoch_batches(0) for r in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 3 + 2 + 1 full batches, split evenly
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen))
    for b in itertools.chain(*per_rank):
        assert len({BUCKETS[i] for i in b}) == 1 and len(b) == 2
    assert ranks[0].epoch_batches(1) != ranks[0].epoch_batches(0)  # reshuffled every epoch


def test_seek_resumes_the_same_stream():
    s = BucketBatchSampler(BUCKETS, 2, seed=4)
    stream = list(itertools.islice(iter(s), 20))  # several epochs
    resumed = BucketBatchSampler(BUCKETS, 2, seed=4)
    resumed.seek(13)
    assert list(itertools.islice(iter(resumed), 7)) == stream[13:]


def test_no_full_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="lower train.batch_size"):
        next(iter(BucketBatchSampler([(9, 64, 96)] * 3, 4, seed=0)))


def test_collate_and_to_device_pad_text_with_zeros_to_the_pipeline_length():
    a, b = torch.ones(3, 8, dtype=torch.bfloat16), 2 * torch.ones(5, 8, dtype=torch.bfloat16)
    batch = collate([{"index": 0, "text": a, "latents": torch.zeros(16, 3, 8, 12, dtype=torch.bfloat16)},
                     {"index": 5, "text": b, "latents": torch.ones(16, 3, 8, 12, dtype=torch.bfloat16)}])
    assert batch["text"].shape == (2, 5, 8) and batch["text"].dtype == torch.bfloat16  # stored dtype, batch length
    assert batch["latents"].shape == (2, 16, 3, 8, 12) and batch["index"].tolist() == [0, 5]
    ready = to_device(batch, "cpu", torch.float32, 512)
    assert ready["text"].shape == (2, 512, 8) and ready["text"].dtype == torch.float32
    assert torch.equal(ready["text"][0, :3], a.float()) and ready["text"][0, 3:].abs().sum() == 0
    assert torch.equal(ready["text"][1, :5], b.float()) and ready["text"][1, 5:].abs().sum() == 0
    assert ready["index"].dtype == torch.int64
