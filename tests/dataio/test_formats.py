"""Clip formats: flac, pcm16 (raw 16-bit samples) and logmel (stored float16 log-mels).

pcm16 is flac's samples without the codec: conversions are lossless both ways and both
back ends give bit-identical views, so training ends on identical weights. A logmel
corpus holds the front end's log-mel within float16 rounding, refuses waveform ops and
another front end by name, and bad members are named and skipped like broken FLAC.
"""

import importlib.util
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dataio.augment import build_augmenter
from dataio.backends.batch import DataConfig, Placement, steps_per_epoch
from dataio.backends.torch_pipeline import DeviceFeeder, wave_loader
from dataio.errors import ManifestError, ShardWriteError
from dataio.formats.base import PCM_SCALE
from dataio.formats.codec import ClipCodec
from dataio.formats.logmel import logmel_frames
from dataio.frontend import FrontendConfig, LogMel
from dataio.reading.manifest import load_manifest
from dataio.reading.remote import tar_samples
from dataio.writing.convert import convert_corpus
from dataio.writing.shard_writer import Encoding
from tests.conftest import PYTHON, checkpoint_weights, cli_env, tiny_overrides
from tests.shard_utils import make_shards, rewrite_members, write_dali_indexes

FRONTEND = FrontendConfig(n_mels=32)  # tiny_overrides' front end
needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="needs nvidia-dali")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same 24 clips (0.3-1.2 s: some shorter than a view) as flac, pcm16 and logmel."""
    root = tmp_path_factory.mktemp("formats")
    make_shards(root / "flac", [6, 6, 6, 6], seconds=0.8)
    _vary_lengths(root / "flac")
    write_dali_indexes(root / "flac")
    convert_corpus(root / "flac", str(root / "pcm16"), Encoding("pcm16"), workers=1, progress=False)
    convert_corpus(root / "flac", str(root / "logmel"), Encoding("logmel", FRONTEND), workers=2, progress=False)
    return root


def _vary_lengths(folder: Path) -> None:
    """Cut each clip to a length of its own, 0.3 to 1.2 s (rewritten as 16-bit FLAC)."""
    import io

    import soundfile as sf

    def change(name: str, payload: bytes) -> bytes:
        if not name.endswith(".flac"):
            return payload
        wave, rate = sf.read(io.BytesIO(payload), dtype="int16")
        index = int(name.split(".")[0][4:])
        keep = int(rate * (0.3 + 0.9 * ((index * 7) % 24) / 23))
        wave = np.concatenate([wave, wave])[:keep]
        out = io.BytesIO()
        sf.write(out, wave, rate, format="FLAC", subtype="PCM_16")
        return out.getvalue()
    rewrite_members(folder, change)


def _members(folder: Path, ext: str) -> dict:
    return {s["__key__"]: bytes(s[ext]) for tar in sorted(folder.glob("*.tar"))
            for s in tar_samples(str(tar), lambda err: False)}


def test_flac_and_pcm16_convert_losslessly_both_ways(corpora, tmp_path):
    back = tmp_path / "flac-again"
    convert_corpus(corpora / "pcm16", str(back), Encoding("flac"), workers=1, progress=False)
    flac, pcm, again = _members(corpora / "flac", "flac"), _members(corpora / "pcm16", "pcm"), _members(back, "flac")
    assert set(flac) == set(pcm) == set(again) and len(flac) == 24
    for key, data in flac.items():
        assert np.array_equal(ClipCodec("flac").open(data).whole(), np.frombuffer(pcm[key], "<i2")), key
        assert again[key] == data, f"{key}: FLAC -> pcm16 -> FLAC changed the bytes"
    original, converted = load_manifest(corpora / "flac"), load_manifest(corpora / "pcm16")
    assert converted.clip_format == "pcm16" and original.clip_format == "flac"
    assert [s.count for s in converted.shards] == [s.count for s in original.shards]
    assert _members(corpora / "flac", "json") == _members(corpora / "pcm16", "json")


def test_logmel_corpus_holds_the_front_ends_log_mel_within_float16_rounding(corpora):
    manifest = load_manifest(corpora / "logmel")
    assert manifest.clip_format == "logmel" and manifest.frontend["n_mels"] == 32
    assert manifest.frontend["n_fft"] == 512 and manifest.frontend["f_max"] == 8000.0
    codec, logmel = ClipCodec.of(manifest), LogMel(FRONTEND)
    mels, flac = _members(corpora / "logmel", "mel"), _members(corpora / "flac", "flac")
    for key, data in flac.items():
        pcm = ClipCodec("flac").open(data).whole()
        stored = codec.open(mels[key]).whole().astype(np.float32)
        live = logmel.db(torch.from_numpy(pcm * np.float32(PCM_SCALE))[None])[0].T.numpy()
        assert stored.shape == live.shape == (len(pcm) // 160 + 1, 32)
        np.testing.assert_allclose(stored, live, rtol=2 ** -11, atol=1e-3)  # float16: 11 significant bits
        # a view cut from the stored frames is the live view's log-mel, but where the live
        # one reflects at the view's edges (two frames each side for a 512-point FFT)
        if len(pcm) >= 8000 + 1600:
            view = logmel.db(torch.from_numpy(pcm[1600:9600] * np.float32(PCM_SCALE))[None])[0].T.numpy()
            np.testing.assert_allclose(stored[10:61][2:-2], view[2:-2], rtol=2 ** -11, atol=1e-3)


def _batches(manifest, fmt_chain=None, **cfg):
    cfg = DataConfig(shards=str(manifest.root), batch_size=4, num_workers=0, view_seconds=0.5, **cfg)
    aug = build_augmenter(fmt_chain, FRONTEND, 0.5, num_views=2, pairs_per_clip=cfg.pairs_per_clip, seed=3,
                          clip_format=manifest.clip_format)
    place = Placement(seed=3, steps=steps_per_epoch(cfg, manifest, 1))
    feed = DeviceFeeder(aug, ClipCodec.of(manifest), place)
    batches = list(wave_loader(cfg, manifest, aug, place, epoch=1, start_step=0, in_workers=False))
    return batches, [feed(b) for b in batches]


def test_torch_back_end_reads_every_format_with_no_decoder_for_pcm16_and_logmel(corpora):
    chain = {"gain": {}, "rrc": {}, "time_mask": {}}
    flac, flac_views = _batches(load_manifest(corpora / "flac"), chain)
    pcm, pcm_views = _batches(load_manifest(corpora / "pcm16"), chain)
    mel, mel_views = _batches(load_manifest(corpora / "logmel"), chain)
    assert len(flac) == len(pcm) == len(mel) == 6
    for a, b, c, va, vb, vc in zip(flac, pcm, mel, flac_views, pcm_views, mel_views):
        assert a.payload.dtype == torch.int16 and torch.equal(a.payload, b.payload)  # the same samples
        assert torch.equal(va.views, vb.views)
        assert a.keys == c.keys and torch.equal(a.indices, c.indices) and a.short == c.short
        assert c.payload.dtype == torch.float16 and c.payload.shape == (4, 2, 51, 32)  # 0.5 s: 51 frames
        assert vc.views.shape == va.views.shape == (4, 2, 1, 32, 51)
    assert sum(b.short for b in flac) > 0, "some clips are shorter than a view"


def test_a_view_cut_from_a_logmel_corpus_is_a_crop_of_the_stored_frames(corpora):
    manifest = load_manifest(corpora / "logmel")
    stored = {k: ClipCodec.of(manifest).open(v).whole() for k, v in _members(corpora / "logmel", "mel").items()}
    floor = np.float16(FRONTEND.floor_db)
    for batch in _batches(manifest)[0]:
        for key, views in zip(batch.keys, batch.payload.numpy()):
            clip = np.concatenate([np.full((51, 32), floor), stored[key], np.full((51, 32), floor)])
            for view in views:  # somewhere in the clip padded with silence on both sides
                assert any(np.array_equal(clip[i:i + 51], view) for i in range(len(clip) - 50)), key


def test_pairs_resampling_and_mixing_work_on_the_new_formats(corpora, tmp_path):
    from dataio.reading.manifest import load_sources

    for fmt in ("pcm16", "logmel"):
        batches, views = _batches(load_manifest(corpora / fmt), pairs_per_clip=2, resampled=True)
        idx = batches[0].indices.tolist()
        assert idx[0] == idx[1] and idx[2] == idx[3] and views[0].views.shape == (4, 2, 1, 32, 51)
    shutil.copytree(corpora / "pcm16", tmp_path / "other")
    mixed = load_sources([{"shards": str(corpora / "pcm16"), "weight": 2}, {"shards": str(tmp_path / "other")}])
    assert mixed.clip_format == "pcm16" and mixed.num_clips == 48
    batches, _ = _batches(mixed)
    assert len(batches) == 12 and max(i for b in batches for i in b.indices.tolist()) >= 24
    with pytest.raises(ManifestError, match="different clip formats"):
        load_sources([{"shards": str(corpora / "flac")}, {"shards": str(corpora / "logmel")}])


def test_gain_on_a_logmel_corpus_is_a_db_offset():
    from dataio.augment import BatchIds

    rng = np.random.default_rng(0)
    pcm = (rng.standard_normal(8000) * 3000).astype(np.int16)
    frames = torch.from_numpy(logmel_frames(pcm, FRONTEND))[None, None, :51]  # [1, 1, T, F]
    frames = frames.expand(1, 2, -1, -1).contiguous()
    ids = BatchIds(indices=torch.tensor([5]), draws=torch.tensor([0]), epoch=0, step=0, rank=0)
    chain = {"gain": {"db": [-20.0, 20.0]}}
    plain = build_augmenter({}, FRONTEND, 0.5, num_views=2, pairs_per_clip=1, seed=1, clip_format="logmel")
    gained = build_augmenter(chain, FRONTEND, 0.5, num_views=2, pairs_per_clip=1, seed=1, clip_format="logmel")
    wave = build_augmenter(chain, FRONTEND, 0.5, num_views=2, pairs_per_clip=1, seed=1)
    offset = (gained.from_db_frames(frames, ids) - plain.from_db_frames(frames, ids)) * FRONTEND.norm_std
    assert offset.std(dim=(2, 3, 4)).max() < 1e-3 and offset.abs().min() > 0.01  # one dB offset per view
    # the same draw as the waveform op: the wave scaled by that many dB
    waves = torch.from_numpy(pcm[:8000].astype(np.float32) * PCM_SCALE)[None, None].expand(1, 2, -1).contiguous()
    wave_offset = (wave.from_waves(waves, ids) - plain.from_waves(waves, ids)) * FRONTEND.norm_std
    torch.testing.assert_close(offset.mean(dim=(2, 3, 4)), wave_offset.median(dim=-1).values.median(dim=-1)
                               .values.median(dim=-1).values, atol=0.01, rtol=0)


def _train(shards: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "trainer.cli.pretrain", *tiny_overrides(shards, run), "train.max_steps=6",
                           "train.ckpt_every=6", *extra], env=cli_env(), capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_pcm16_trains_the_weights_flac_trains(corpora, tmp_path, backend):
    weights = []
    for fmt in ("flac", "pcm16"):
        out = _train(corpora / fmt, tmp_path / fmt, f"data.backend={backend}")
        assert out.returncode == 0, out.stderr[-3000:]
        weights.append(checkpoint_weights(tmp_path / fmt / "checkpoints" / "step_00000006"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_a_logmel_corpus_trains_on_either_back_end(corpora, tmp_path, backend):
    chain = "augment={reverse: {p: 0.5}, polarity: {}, gain: {}, rrc: {}, pitch_shift: {}}"  # those a log-mel allows
    out = _train(corpora / "logmel", tmp_path / "run", f"data.backend={backend}", chain)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "encoder.safetensors").is_file()


@pytest.mark.e2e
def test_a_logmel_corpus_refuses_waveform_ops_and_another_front_end_by_name(corpora, tmp_path):
    out = _train(corpora / "logmel", tmp_path / "a", "augment={speed: {}, rrc: {}}")
    assert out.returncode == 2 and "augment.speed" in out.stderr and "logmel" in out.stderr
    assert "Traceback" not in out.stderr
    out = _train(corpora / "logmel", tmp_path / "b", "frontend.n_mels=40", "frontend.hop_ms=12.5")
    assert out.returncode == 2 and "frontend.n_mels: the recipe has 40, the corpus 32" in out.stderr
    assert "frontend.hop_ms: the recipe has 12.5, the corpus 10.0" in out.stderr
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


@pytest.mark.e2e
def test_unknown_clip_format_in_a_manifest_is_named(corpora, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    raw = json.loads((corpora / "pcm16" / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**raw, "clip_format": "opus"}))
    with pytest.raises(ManifestError, match="clip_format 'opus' is not one of flac, pcm16, logmel"):
        load_manifest(folder, check_files=False)
    out = _train(folder, tmp_path / "run")
    assert out.returncode == 2 and "clip_format 'opus'" in out.stderr


def _damage(folder: Path, ext: str, cut: int) -> str:
    """Shorten the second ``ext`` member of the first shard by ``cut`` bytes; its key."""
    victim = []

    def change(name: str, payload: bytes) -> bytes:
        if name.endswith("." + ext) and len(victim) < 2:
            victim.append(name.split(".")[0])
            return payload[:-cut] if len(victim) == 2 else payload
        return payload
    rewrite_members(folder, change)
    return victim[1]


@pytest.mark.e2e
@pytest.mark.parametrize("fmt,ext,cut,why", [("pcm16", "pcm", 1, "even byte count"),
                                              ("logmel", "mel", 2, "whole number of 32-band float16 frames")])
def test_a_member_that_does_not_fit_its_format_is_named_skipped_and_counted(corpora, tmp_path, fmt, ext, cut, why):
    folder = tmp_path / fmt
    shutil.copytree(corpora / fmt, folder)
    key = _damage(folder, ext, cut)
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "check-shards", str(folder), "--workers", "1"],
                         env=cli_env(), capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1 and f"\t{key}\t" in out.stdout and why in out.stdout, out.stdout
    batches, _ = _batches(load_manifest(folder))
    assert sum(b.skipped for b in batches) >= 1 and key not in [k for b in batches for k in b.keys]
    if importlib.util.find_spec("nvidia.dali") is not None:  # a DALI batch cannot drop it: a clear stop
        out = _train(folder, tmp_path / "dali", "data.backend=dali")
        assert out.returncode == 1 and "audioclr check-shards" in out.stderr and "Traceback" not in out.stderr


def test_non_finite_stored_frames_are_skipped_and_counted(corpora, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(corpora / "logmel", folder)
    hit = []

    def change(name: str, payload: bytes) -> bytes:
        if name.endswith(".mel") and not hit:
            hit.append(name.split(".")[0])
            frames = np.frombuffer(payload, "<f2").copy()
            frames[::7] = np.nan
            return frames.tobytes()
        return payload
    rewrite_members(folder, change)
    batches, _ = _batches(load_manifest(folder))
    assert sum(b.skipped for b in batches) >= 1 and hit[0] not in [k for b in batches for k in b.keys]
    assert all(torch.isfinite(b.payload).all() for b in batches)


@pytest.mark.e2e
def test_convert_refuses_what_it_cannot_do_and_leaves_no_manifest_when_it_fails(corpora, tmp_path):
    def convert(src, out, fmt, *extra):
        return subprocess.run([PYTHON, "-m", "trainer.cli", "shard", "convert", str(src), "--format", fmt, "--out",
                               str(out), "--workers", "1", *extra], env=cli_env(), capture_output=True, text=True,
                              timeout=120, check=False)
    out = convert(corpora / "logmel", tmp_path / "x", "flac")
    assert out.returncode == 2 and "holds log-mels, not audio" in out.stderr
    out = convert(corpora / "pcm16", tmp_path / "y", "pcm16")
    assert out.returncode == 2 and "already a pcm16 corpus" in out.stderr
    out = convert(corpora / "flac", corpora / "pcm16", "pcm16")
    assert out.returncode == 2 and "--overwrite" in out.stderr
    out = convert(corpora / "flac", tmp_path / "z", "pcm16", "--config", "nowhere.yaml")
    assert out.returncode == 2 and "--config gives the front end of a logmel corpus" in out.stderr
    broken = tmp_path / "broken"
    shutil.copytree(corpora / "flac", broken)
    from tests.shard_utils import corrupt_member
    key = corrupt_member(broken / "shard-00002.tar")
    out = convert(broken, tmp_path / "half", "pcm16")
    assert out.returncode == 2 and key in out.stderr and "check-shards" in out.stderr, out.stderr
    assert not (tmp_path / "half" / "manifest.json").exists()
    with pytest.raises(ShardWriteError, match="logmel corpus needs the front end"):
        from dataio.writing.shard_writer import check_encoding
        check_encoding(Encoding("logmel"), 16000)


@pytest.mark.e2e
def test_shard_writes_every_format_from_audio_files(tmp_path):
    import soundfile as sf

    for label in ("a", "b"):
        (tmp_path / "audio" / label).mkdir(parents=True)
        for i in range(3):
            t = np.arange(8000 + 1000 * i) / 16000
            sf.write(tmp_path / "audio" / label / f"{i}.wav", 0.3 * np.sin(2 * np.pi * (300 + 200 * i) * t), 16000)
    sizes = {}
    for fmt in ("flac", "pcm16", "logmel"):
        out = subprocess.run([PYTHON, "-m", "trainer.cli", "shard", str(tmp_path / "audio"), "--out",
                              str(tmp_path / fmt), "--format", fmt, "--workers", "1"], env=cli_env(),
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        manifest = load_manifest(tmp_path / fmt)
        assert manifest.clip_format == fmt and manifest.num_clips == 6
        sizes[fmt] = sum(s.bytes for s in manifest.shards)
        with tarfile.open(tmp_path / fmt / "shard-00000.tar") as tar:
            assert {n.rsplit(".", 1)[1] for n in tar.getnames()} == {"json", {"flac": "flac", "pcm16": "pcm",
                                                                              "logmel": "mel"}[fmt]}
    assert load_manifest(tmp_path / "logmel").frontend["n_mels"] == 64  # the default front end
    pcm = _members(tmp_path / "pcm16", "pcm")
    assert sum(len(v) for v in pcm.values()) == 2 * 2 * (8000 + 9000 + 10000)


def test_evaluation_reads_pcm16_and_names_a_logmel_corpus(corpora, tmp_path):
    from trainer.evaluate.clips import load_clipset

    flac = load_clipset(load_manifest(corpora / "flac"), keep_audio=True)
    pcm = load_clipset(load_manifest(corpora / "pcm16"), keep_audio=True)
    assert flac.keys == pcm.keys
    streamed = load_clipset(load_manifest(corpora / "pcm16"))  # no audio held: read from the shards
    assert not streamed.held and [r for r, _ in streamed.waves([2, 0, 1])] == [0, 1, 2]
    for (row, wave), held in zip(streamed.waves(range(len(pcm))), range(len(pcm))):
        assert row == held and np.array_equal(wave, pcm.wave(held))
    for row in range(len(flac)):
        assert np.array_equal(flac.wave(row), pcm.wave(row))
        rng_a, rng_b = np.random.default_rng(row), np.random.default_rng(row)
        assert np.array_equal(flac.crop(flac.audio[row], 8000, rng_a), pcm.crop(pcm.audio[row], 8000, rng_b))
    with pytest.raises(ValueError, match="evaluate on the flac or pcm16 corpus"):
        load_clipset(load_manifest(corpora / "logmel"))


@needs_dali
def test_dali_cuts_logmel_views_from_the_stored_frames_and_pcm16_views_as_flac(corpora):
    from dataio.backends.dali_pipeline import DaliSource

    def views(fmt):
        manifest = load_manifest(corpora / fmt)
        cfg = DataConfig(shards=str(manifest.root), backend="dali", batch_size=4, num_workers=1, view_seconds=0.5)
        aug = build_augmenter({}, FRONTEND, 0.5, num_views=2, pairs_per_clip=1, seed=3,
                              clip_format=manifest.clip_format)
        source = DaliSource(cfg, manifest, FRONTEND, aug, Placement(seed=3, steps=6))
        return list(source.epoch(0, 0))

    flac, pcm, mel = views("flac"), views("pcm16"), views("logmel")
    for a, b in zip(flac, pcm):
        assert a.keys == b.keys and torch.equal(a.views, b.views)
    codec = ClipCodec.of(load_manifest(corpora / "logmel"))
    stored = {k: codec.open(v).whole().astype(np.float32) for k, v in _members(corpora / "logmel", "mel").items()}
    floor = FRONTEND.floor_db
    for batch in mel:
        assert batch.views.shape == (4, 2, 1, 32, 51)
        for key, pair in zip(batch.keys, batch.views):
            clip = np.concatenate([np.full((51, 32), floor), stored[key], np.full((51, 32), floor)])
            for view in pair[:, 0].numpy():  # [F, T], normalised
                frames = view.T * FRONTEND.norm_std + FRONTEND.norm_mean
                assert any(np.abs(clip[i:i + 51] - frames).max() < 1e-3 for i in range(len(clip) - 50)), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_every_format_feeds_the_gpu_the_views_the_cpu_gets(corpora, backend):
    from dataio.backends.registry import open_source

    def views(fmt, device):
        manifest = load_manifest(corpora / fmt)
        cfg = DataConfig(shards=str(manifest.root), backend=backend, batch_size=4, num_workers=1, view_seconds=0.5)
        aug = build_augmenter({"rrc": {}, "time_mask": {}}, FRONTEND, 0.5, num_views=2, pairs_per_clip=1, seed=3,
                              clip_format=manifest.clip_format)
        place = Placement(seed=3, steps=6, device=torch.device(device))
        source = open_source(cfg, manifest, FRONTEND, aug, place)
        return [b.views.cpu() for b in source.epoch(0, 0)]

    flac, pcm = views("flac", "cuda"), views("pcm16", "cuda")
    assert all(torch.equal(a, b) for a, b in zip(flac, pcm))
    for gpu, cpu in zip(views("logmel", "cuda"), views("logmel", "cpu")):
        torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


def test_convert_in_one_process_runs_on_one_torch_thread_and_gives_the_rest_back(tiny_shards, tmp_path, monkeypatch):
    """Issue 35, item 6: with one shard or --workers 1 the log-mels ran in the main process
    on every core's thread, 6.4x slower than one thread; now one, as a pool worker has."""
    import dataio.writing.convert as convert

    seen, real = [], convert.convert_shard

    def recording(*args):
        seen.append(torch.get_num_threads())
        return real(*args)
    monkeypatch.setattr(convert, "convert_shard", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        convert_corpus(tiny_shards, str(tmp_path / "mel"), Encoding("logmel", FRONTEND), workers=1, progress=False)
        assert seen == [1, 1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
