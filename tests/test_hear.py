"""The HEAR 2021 API over an exported encoder: sizes, shapes, millisecond timestamps,
batching that changes nothing, and named errors for bad calls."""

import importlib.util
import shutil
import subprocess

import pytest
import torch

import trainer.hear as hear
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
    assert torch.allclose(scene, emb.mean(1), atol=1e-6)


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


def test_load_model_needs_a_run_with_an_encoder(tmp_path):
    with pytest.raises(ValueError, match="give the run folder"):
        hear.load_model("")
    with pytest.raises(FileNotFoundError, match="holds no exported encoder"):
        hear.load_model(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("hearvalidator") is None or shutil.which("hear-validator") is None,
                    reason="hearvalidator is not installed (it brings TensorFlow)")
def test_hear_validator_accepts_the_module(model_dir):
    out = subprocess.run(["hear-validator", "trainer.hear", "--model", str(model_dir)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
