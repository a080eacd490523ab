"""The training engine: reproducible fits, on-device augmentation, validation, compile fallback, devices."""

import re

import pytest
import torch

from transferlab import config, training
from transferlab.errors import UserError
from transferlab.models import create_model
from transferlab.training import (FitHooks, TrainConfig, fit, flip_images, random_shift, resolve_device,
                                  shift_images)

CPU = torch.device("cpu")


def tiny_data(n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 60, (n, 1, 12, 12), dtype=torch.uint8, generator=g)
    for k in range(4):  # a bright square whose place gives the class away
        images[labels == k, :, 2 * k:2 * k + 4, 2:6] = 250
    return images, labels


def tiny_model(seed=0):
    torch.manual_seed(seed)
    # a conv net (exercises channels_last) with a BatchNorm (exercises buffers)
    return create_model("vgg", num_classes=4, image_size=12, cfg=[4, "M"], hidden=8, dropout=0.1)


def train(config, seed=0, **kwargs):
    images, labels = tiny_data()
    model = tiny_model()
    result = fit(model, images, labels, config, CPU, seed=seed, progress=False, **kwargs)
    return model, result


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fit_is_reproducible_with_a_seed_and_learns():
    config = TrainConfig(epochs=3, batch_size=32, lr=1e-2, augment_shift=1)
    first, result = train(config)
    second, _ = train(config)
    assert same_state(first, second)
    other, _ = train(config, seed=1)
    assert not same_state(first, other)
    assert len(result.history) == 3 and result.images_per_second > 0
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert not first.training  # fit leaves the model in eval mode


def test_random_shift_keeps_shape_and_moves_content():
    images = torch.zeros(64, 2, 9, 9)
    images[:, :, 4, 4] = 1.0  # one bright pixel in the centre
    out = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.equal(out.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)))  # the pixel never falls off
    where = out[:, 0].flatten(1).argmax(1)
    rows, cols = where // 9, where % 9
    assert ((rows - 4).abs() <= 2).all() and ((cols - 4).abs() <= 2).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # images move, each its own way
    assert torch.equal(out[:, 0], out[:, 1])  # channels of an image move together


def test_flip_images_mirrors_only_the_chosen_images():
    images = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    out = flip_images(images, torch.tensor([True, False]))
    assert torch.equal(out[0, 0], images[0, 0, :, [3, 2, 1, 0]]) and torch.equal(out[1], images[1])


def test_flips_are_seeded_and_change_the_training():
    plain = TrainConfig(epochs=2, batch_size=32, lr=1e-2, augment_shift=1)
    flipped = TrainConfig(epochs=2, batch_size=32, lr=1e-2, augment_shift=1, augment_flip=True)
    first, _ = train(plain)
    mirrored, _ = train(flipped)
    again, _ = train(flipped)
    assert same_state(mirrored, again) and not same_state(first, mirrored)


def test_shift_images_moves_by_the_given_offsets():
    images = torch.zeros(1, 1, 5, 5)
    images[0, 0, 2, 2] = 1.0
    moved = shift_images(images, torch.tensor([[0], [2]]), 1)  # content moves by max_shift - shift: (+1, -1)
    assert moved[0, 0, 3, 1] == 1.0 and moved.sum() == 1.0
    assert torch.equal(shift_images(images, torch.tensor([[1], [1]]), 1), images)  # shift = max_shift: unchanged


def test_val_fraction_holds_out_a_stratified_share_and_records_its_accuracy():
    _, result = train(TrainConfig(epochs=2, batch_size=32, val_fraction=0.25))
    assert all(0.0 <= record["val_accuracy"] <= 1.0 for record in result.history)
    held_out = result.val_indices
    assert len(held_out) == 48 and len(set(held_out.tolist())) == 48
    _, labels = tiny_data()
    assert torch.bincount(labels[held_out], minlength=4).tolist() == [12, 12, 12, 12]


def test_compile_failing_at_the_first_step_falls_back_to_an_eager_run(monkeypatch, capsys):
    eager, _ = train(TrainConfig(epochs=1, batch_size=32))

    def broken_compile(model, **kwargs):
        def compiled(x):
            model(x)  # the attempt touches BatchNorm statistics before it fails
            raise RuntimeError("backend compiler failed")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    fallback, _ = train(TrainConfig(epochs=1, batch_size=32, compile=True))
    assert "torch.compile failed" in capsys.readouterr().out
    assert same_state(eager, fallback)


def test_compile_unavailable_falls_back(monkeypatch, capsys):
    def no_compile(model, **kwargs):
        raise RuntimeError("not supported on this platform")

    monkeypatch.setattr(torch, "compile", no_compile)
    model, result = train(TrainConfig(epochs=1, batch_size=64, compile=True))
    assert "running eagerly" in capsys.readouterr().out
    assert len(result.history) == 1


def test_compile_that_works_is_used(monkeypatch):
    calls = []

    def counting_compile(model, **kwargs):
        def compiled(x):
            calls.append(len(x))
            return model(x)
        return compiled

    monkeypatch.setattr(torch, "compile", counting_compile)
    train(TrainConfig(epochs=1, batch_size=64, compile=True))
    assert calls == [64, 64, 64]


def test_channels_last_only_where_there_are_convolutions():
    conv, result = train(TrainConfig(epochs=1, channels_last=True, precision="fp32"))
    assert result.numerics.channels_last
    assert conv.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    _, result = train(TrainConfig(epochs=1, channels_last=False, precision="fp32"))
    assert not result.numerics.channels_last
    mlp = training.choose_numerics(create_model("mlp"), CPU, "auto", batch_size=8, sample_shape=(1, 28, 28))
    assert not mlp.channels_last  # nothing to measure: no 2-D convolutions


def test_predict_is_independent_of_batch_size():
    model, _ = train(TrainConfig(epochs=1))
    images, _ = tiny_data()
    one = training.predict(model, images, CPU, batch_size=7)
    many = training.predict(model, images, CPU, batch_size=4096)
    assert torch.equal(one, many) and one.dtype == torch.long and len(one) == len(images)


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(UserError, match="CUDA is not available"):
                resolve_device(name)


def test_autocast_follows_the_numerics_not_the_cpu_flags():
    with training.Numerics("bf16").autocast(CPU):
        assert torch.is_autocast_enabled("cpu")
    with training.Numerics("fp32").autocast(CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_cpu_threads_follow_the_machine_and_omp_num_threads(monkeypatch):
    import os

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert training.configure_cpu_threads() == len(training.usable_cores())
        assert training.configure_cpu_threads() == training.configure_cpu_threads()  # not load-dependent
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert training.configure_cpu_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_fit_is_exactly_a_plain_loop_in_the_same_order():
    """With fp32 and contiguous tensors, fit computes what a textbook loop over the same
    permutations computes, bit for bit: the speed comes from where the data lives, not from
    a different training procedure."""
    images, labels = tiny_data()
    config = TrainConfig(epochs=2, batch_size=48, lr=1e-2, schedule="constant", precision="fp32",
                         channels_last=False)
    engine = tiny_model()
    fit(engine, images, labels, config, CPU, seed=3, progress=False)

    plain = tiny_model()
    optimizer = torch.optim.Adam(plain.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        plain.train()
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 48):
            index = order[start:start + 48]
            loss = torch.nn.functional.cross_entropy(plain(images[index].float() / 255), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert same_state(engine, plain)


def test_min_steps_adds_epochs_only_when_the_data_is_small():
    # 192 images at batch 32 are 6 steps an epoch: 2 epochs give 12 steps, so min_steps 30 needs 5 epochs.
    _, raised = train(TrainConfig(epochs=2, batch_size=32, min_steps=30))
    assert (raised.epochs_asked, raised.epochs_used, raised.steps) == (2, 5, 30)
    assert len(raised.history) == 5
    _, kept = train(TrainConfig(epochs=3, batch_size=32, min_steps=10))  # 18 steps already
    assert (kept.epochs_asked, kept.epochs_used, len(kept.history)) == (3, 3, 3)
    _, off = train(TrainConfig(epochs=1, batch_size=32, min_steps=0))
    assert off.epochs_used == 1


def test_min_steps_default_and_validation(monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_MIN_STEPS", 600)
    assert TrainConfig().validate().min_steps == 600
    # 1,000 images at batch 128: 8 steps an epoch, so 10 epochs (80 steps) become 75 (600 steps)
    assert training.epochs_for(TrainConfig(epochs=10), 1000) == 75
    assert training.epochs_for(TrainConfig(epochs=10), 10000) == 10
    with pytest.raises(UserError, match="min-steps"):
        TrainConfig(min_steps=-1).validate()


def test_piped_progress_frames_keep_their_elapsed_and_remaining_times(capsys, monkeypatch):
    # A log file (stderr not a terminal) used to get rich's 80 columns, which cut both time columns off.
    monkeypatch.delenv("COLUMNS", raising=False)
    images, labels = tiny_data()
    fit(tiny_model(), images, labels, TrainConfig(epochs=1, batch_size=64, precision="fp32", min_steps=0), CPU,
        progress=True, hooks=FitHooks(description="pretrain kmnist-sample-resnet-with-a-long-name"))
    frame = [line for line in capsys.readouterr().err.splitlines() if "img/s" in line][-1]
    assert len(re.findall(r"\d+:\d\d:\d\d", frame)) == 2, frame
