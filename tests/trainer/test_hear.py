"""The HEAR 2021 API over an exported encoder: sizes, shapes, millisecond timestamps,
batching that changes nothing and costs few encoder passes, and named errors for bad calls."""

import importlib.util
import shutil
import subprocess

import pytest
import torch

import trainer.models.hear as hear
from tests.conftest import export_random_encoder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hear")
    export_random_encoder(folder, width=4, view_seconds=0.5)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return hear.load_model(str(model_dir), batch_size=7)


def test_the_model_says_what_hear_asks(model):
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == model.timestamp_embedding_size > 0


def test_timestamp_embeddings_are_centred_every_50_ms_from_zero(model):
    audio = 0.1 * torch.randn(3, 16000 + 123, generator=torch.Generator().manual_seed(0))
    emb, stamps = hear.get_timestamp_embeddings(audio, model)
    count = (16000 + 123) // 800 + 1
    assert emb.shape == (3, count, model.timestamp_embedding_size) and emb.dtype == torch.float32
    assert stamps.shape == (3, count) and torch.allclose(stamps[1], torch.arange(count) * 50.0)
    assert bool((stamps[:, 1:] > stamps[:, :-1]).all()), "monotonic"
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (3, model.scene_embedding_size)
    step = model.scene_hop // model.hop  # the scene grid (250 ms) is every 5th timestamp (50 ms)
    assert model.scene_hop == step * model.hop == 4000
    assert torch.allclose(scene, emb[:, ::step].mean(1), atol=1e-6)


def test_a_sound_embeds_alike_alone_or_in_a_batch_and_sounds_differ(model):
    g = torch.Generator().manual_seed(1)
    audio = 0.1 * torch.randn(4, 9000, generator=g)
    together = hear.get_scene_embeddings(audio, model)
    alone = hear.get_scene_embeddings(audio[2:3], model)
    assert torch.allclose(together[2], alone[0], atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)
    short = hear.get_timestamp_embeddings(audio[:, :100], model)[0]  # shorter than a window and a hop
    assert short.shape[:2] == (4, 1) and torch.isfinite(short).all()


@pytest.mark.parametrize("audio,kwargs,words", [
    (torch.zeros(2, 1, 16000), {}, "expected a 2-D tensor [n_sounds, n_samples], got 3-D (2, 1, 16000)"),
    (torch.zeros(0, 16000), {}, "an empty batch (0, 16000)"),
    (torch.zeros(2, 16000, dtype=torch.int16), {}, "expected float samples"),
    (torch.zeros(2, 16000), {"sample_rate": 44100}, "audio at 44100 Hz: this model takes 16000 Hz"),
])
def test_bad_calls_are_named(model, audio, kwargs, words):
    with pytest.raises(ValueError) as err:
        hear.get_scene_embeddings(audio, model, **kwargs)
    assert words in str(err.value)


@pytest.mark.parametrize("fn", [hear.get_scene_embeddings, hear.get_timestamp_embeddings],
                         ids=["scene", "timestamp"])
@pytest.mark.parametrize("bad,words", [(float("nan"), "sound 2 of the batch holds 1 NaN samples (of 8000)"),
                                       (float("inf"), "sound 2 of the batch holds 1 Inf samples (of 8000)"),
                                       (-float("inf"), "sound 2 of the batch holds 1 Inf samples (of 8000)")],
                         ids=["nan", "inf", "-inf"])
def test_a_sound_with_nan_or_inf_is_named_before_any_compute(model, fn, bad, words):
    audio = torch.zeros(4, 8000)
    audio[2, 100] = bad
    calls = []
    handle = model.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError) as err:
            fn(audio, model)
    finally:
        handle.remove()
    assert words in str(err.value) and not calls


def test_every_bad_sound_is_counted_and_named(model):
    audio = torch.zeros(5, 8000)
    audio[1, :3] = float("nan")
    audio[1, 5] = float("inf")
    audio[4, 0] = float("inf")
    with pytest.raises(ValueError) as err:
        hear.get_scene_embeddings(audio, model)
    assert "sound 1 of the batch holds 3 NaN and 1 Inf samples (of 8000); sounds [4] also hold NaN or Inf" \
        in str(err.value)


def encoder_batches(model, call) -> tuple[object, list[int]]:
    """What ``call()`` returns and the batch size of each encoder pass it made."""
    sizes = []
    handle = model.encoder.register_forward_hook(lambda _module, args, _out: sizes.append(args[0].shape[0]))
    try:
        return call(), sizes
    finally:
        handle.remove()


def test_a_batch_of_4_s_clips_shares_few_encoder_passes(model_dir):
    """What heareval sends: a 4-s clip takes 17 scene windows (every 250 ms, not 81 every
    50 ms), and the windows of all sounds go through the encoder together."""
    audio = 0.1 * torch.randn(4, 4 * 16000, generator=torch.Generator().manual_seed(2))
    big = hear.load_model(str(model_dir), batch_size=256)
    _, sizes = encoder_batches(big, lambda: hear.get_scene_embeddings(audio, big))
    assert sizes == [4 * 17], "four 4-s sounds take one encoder pass, not four"
    small = hear.load_model(str(model_dir), batch_size=7)
    _, sizes = encoder_batches(small, lambda: hear.get_scene_embeddings(audio, small))
    assert sum(sizes) == 4 * 17 and len(sizes) == -(-4 * 17 // 7) and max(sizes) == 7, \
        "chunks of batch_size windows that span sounds: memory holds one chunk"


def test_sounds_embed_alike_in_shared_passes_or_alone(model_dir):
    """A chunk of windows that spans two sounds changes no embedding, scene or timestamp."""
    model = hear.load_model(str(model_dir), batch_size=7)
    audio = 0.1 * torch.randn(4, 12000, generator=torch.Generator().manual_seed(3))
    scene, scene_sizes = encoder_batches(model, lambda: hear.get_scene_embeddings(audio, model))
    (emb, _), stamp_sizes = encoder_batches(model, lambda: hear.get_timestamp_embeddings(audio, model))
    assert scene_sizes == [7, 7, 2] and len(stamp_sizes) == -(-4 * 16 // 7)  # 4 and 16 windows a sound
    alone_scene = torch.cat([hear.get_scene_embeddings(audio[i:i + 1], model) for i in range(4)])
    alone_emb = torch.cat([hear.get_timestamp_embeddings(audio[i:i + 1], model)[0] for i in range(4)])
    assert torch.allclose(scene, alone_scene, atol=1e-5) and torch.allclose(emb, alone_emb, atol=1e-5)


def test_load_model_needs_a_run_with_an_encoder(tmp_path):
    with pytest.raises(ValueError, match="give the run folder"):
        hear.load_model("")
    with pytest.raises(FileNotFoundError, match="holds no exported encoder"):
        hear.load_model(str(tmp_path))


@pytest.mark.e2e
@pytest.mark.skipif(importlib.util.find_spec("hearvalidator") is None or shutil.which("hear-validator") is None,
                    reason="hearvalidator is not installed (it brings TensorFlow)")
def test_hear_validator_accepts_the_module(model_dir):
    out = subprocess.run(["hear-validator", "trainer.models.hear", "--model", str(model_dir)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
