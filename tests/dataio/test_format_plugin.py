"""A clip format is a module and a registry line (issue 37, item 1): a toy format, float16
samples, written by ``convert``, read by both back ends' CPU paths, with no other file
touched. What the three shipped formats answer is the interface it fills in."""

import importlib.util

import numpy as np
import pytest
import torch

from dataio import formats
from dataio.augment import build_augmenter
from dataio.backends.batch import DataConfig, Placement
from dataio.backends.registry import open_source
from dataio.formats.base import ClipFormat
from dataio.formats.clip import samples_of
from dataio.frontend import FrontendConfig
from dataio.reading.manifest import load_manifest
from dataio.writing.convert import convert_corpus
from dataio.writing.shard_writer import Encoding
from tests.shard_utils import make_shards, write_dali_indexes

FRONTEND = FrontendConfig(n_mels=32)
needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="needs nvidia-dali")


class Float16Wave(ClipFormat):
    """The toy: samples as raw little-endian float16 (half pcm16's precision)."""
    name, ext, summary = "f16wave", "f16", "float16 samples, raw"
    dtype, dali_type = np.dtype(np.float16), "FLOAT16"

    def encode(self, pcm, rate, logmel=None):
        return (pcm.astype(np.float32) / 32768).astype("<f2").tobytes()

    def open(self, data, codec):
        return samples_of(data, "<f2", self.name)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    make_shards(root / "flac", [6, 6], seconds=0.8)
    write_dali_indexes(root / "flac")
    formats.register(Float16Wave())
    try:
        convert_corpus(root / "flac", str(root / "pcm16"), Encoding("pcm16"), workers=1, progress=False)
        convert_corpus(root / "flac", str(root / "f16wave"), Encoding("f16wave"), workers=1, progress=False)
        write_dali_indexes(root / "f16wave")
        yield root
    finally:
        formats.FORMATS.pop("f16wave")


def _views(folder, backend):
    manifest = load_manifest(folder)
    cfg = DataConfig(shards=str(folder), backend=backend, batch_size=4, num_workers=0 if backend == "torch" else 1,
                     view_seconds=0.5)
    aug = build_augmenter({"gain": {}, "rrc": {}}, FRONTEND, 0.5, num_views=2, pairs_per_clip=1, seed=3,
                          clip_format=manifest.clip_format)
    source = open_source(cfg, manifest, FRONTEND, aug, Placement(seed=3, steps=3))
    return list(source.epoch(0, 0))


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_a_new_format_is_a_class_and_a_registry_line_read_by_both_back_ends(corpora, backend):
    manifest = load_manifest(corpora / "f16wave")
    assert manifest.clip_format == "f16wave" and manifest.format.ext == "f16"
    assert all(s.url.endswith(".tar") for s in manifest.shards)
    toy, pcm = _views(corpora / "f16wave", backend), _views(corpora / "pcm16", backend)
    assert len(toy) == len(pcm) == 3
    for a, b in zip(toy, pcm):  # the same clips, crops and draws; samples rounded to float16
        assert a.keys == b.keys and a.views.shape == b.views.shape == (4, 2, 1, 32, 51)
        assert not torch.equal(a.views, b.views)  # float16 is not int16: the toy's own samples were read
        torch.testing.assert_close(a.views, b.views, atol=0.02, rtol=0)  # normalised log-mel units


def test_what_every_shipped_format_answers():
    flac, pcm16, logmel = (formats.clip_format(n) for n in ("flac", "pcm16", "logmel"))
    assert [f.ext for f in (flac, pcm16, logmel)] == ["flac", "pcm", "mel"]
    assert flac.is_wave and pcm16.is_wave and not logmel.is_wave and logmel.stores_frontend
    assert flac.compressed and not pcm16.compressed
    assert "pcm16" in flac.lossless_to and "flac" in pcm16.lossless_to and not logmel.lossless_to
    assert (flac.arrives_as, logmel.arrives_as) == ("waves", "db_frames")
    assert pcm16.payload(2, 3, 5).dtype == np.int16 and logmel.payload(2, 3, 5, 32).shape == (2, 3, 5, 32)
    with pytest.raises(ValueError, match="unknown clip format 'mp3': one of flac, pcm16, logmel"):
        formats.clip_format("mp3")
    with pytest.raises(ValueError, match="registered already"):
        formats.register(Float16Wave.__new__(type("Other", (Float16Wave,), {"name": "flac"})))
