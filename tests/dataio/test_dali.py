"""The DALI back end on CPU (device_id=None): parity with torchaudio, rank split, K pairs per clip."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from dataio.augment import build_augmenter  # noqa: E402
from dataio.backends.batch import DataConfig, Placement  # noqa: E402
from dataio.backends.dali_pipeline import DaliBatches, numpy_logmel  # noqa: E402
from dataio.frontend import FrontendConfig, LogMel  # noqa: E402
from dataio.reading.manifest import load_manifest  # noqa: E402
from tests.shard_utils import make_shards  # noqa: E402


def _waves(n=4, seconds=1.3, rate=16000):
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    out = [0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(len(t)) for f in (110, 440, 3000)]
    out.append(1e-4 * rng.standard_normal(len(t)))  # near silence: exercises the log floor
    return np.stack(out[:n]).astype(np.float32)


@pytest.mark.parametrize("cfg", [FrontendConfig(), FrontendConfig(n_mels=128, mel_scale="htk", f_min=0.0,
                                                                  win_ms=32.0, hop_ms=8.0, f_max=7000.0),
                                 FrontendConfig(sample_rate=44100, win_ms=1024 / 44.1, hop_ms=512 / 44.1,
                                                n_mels=128, window="hamming")],
                         ids=["default", "htk128", "soundclr-hamming"])
def test_dali_and_torchaudio_log_mels_agree(cfg):
    waves = _waves()
    ours = LogMel(cfg)(torch.from_numpy(waves))[:, 0].numpy()
    dali = numpy_logmel(waves, cfg)
    assert ours.shape == dali.shape
    max_db = float(np.abs(ours - dali).max() * cfg.norm_std)
    print(f"max |torchaudio - DALI| = {max_db:.2e} dB")
    assert max_db < 0.01


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dali_shards")
    make_shards(folder, [8, 8, 8, 8], seconds=1.0)
    from tests.shard_utils import write_dali_indexes
    write_dali_indexes(folder)
    return load_manifest(folder)


def _source(manifest, rank=0, world=1, checkpoint=None, augment=None, **kw):
    cfg = DataConfig(shards=str(manifest.root), batch_size=4, num_workers=1, view_seconds=0.5, **kw)
    frontend = FrontendConfig(n_mels=32)
    aug = build_augmenter(augment, frontend, cfg.view_seconds, num_views=cfg.num_views,
                          pairs_per_clip=cfg.pairs_per_clip, seed=0)
    return DaliBatches(cfg, manifest, frontend, aug, Placement(rank=rank, world_size=world), checkpoint=checkpoint)


def _batches(manifest, rank, world, steps, **kw):
    it = _source(manifest, rank, world, **kw)
    return [it.next_batch(0, s) for s in range(steps)], it


def test_batches_have_the_shared_layout(shards):
    (batch,), _ = _batches(shards, 0, 1, 1)
    assert batch.views.shape == (4, 2, 1, 32, 51)
    assert batch.labels.tolist() == [i % 3 for i in batch.indices.tolist()]
    assert all(k.startswith("clip") for k in batch.keys)
    assert not torch.equal(batch.views[:, 0], batch.views[:, 1])


def test_each_rank_reads_its_own_part(shards):
    seen = [set(i for b in _batches(shards, r, 2, 4)[0] for i in b.indices.tolist()) for r in range(2)]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(32))


def test_pairs_per_clip_repeat_each_clip(shards):
    (batch,), _ = _batches(shards, 0, 1, 1, pairs_per_clip=2)
    idx = batch.indices.tolist()
    assert len(idx) == 4 and idx[0] == idx[1] and idx[2] == idx[3]
    assert not torch.equal(batch.views[0], batch.views[1])


def test_pipeline_checkpoint_resumes_the_same_batches(shards):
    full, _ = _batches(shards, 0, 1, 6)
    _, first = _batches(shards, 0, 1, 3)
    resumed = _source(shards, checkpoint=first.state())
    for step, want in enumerate(full[3:], start=3):
        got = resumed.next_batch(0, step)
        assert got.indices.tolist() == want.indices.tolist()
        assert torch.equal(got.views, want.views)


def test_truncated_shard_is_left_out(tmp_path):
    from dataio.backends.dali_pipeline import readable_shards
    from tests.shard_utils import write_dali_indexes

    make_shards(tmp_path, [5, 5, 5])
    write_dali_indexes(tmp_path)
    path = tmp_path / "shard-00001.tar"
    path.write_bytes(path.read_bytes()[:5000])
    manifest = load_manifest(tmp_path)
    assert [s.url for s in readable_shards(manifest)] == ["shard-00000.tar", "shard-00002.tar"]
    batches, _ = _batches(manifest, 0, 1, 3)
    assert {i for b in batches for i in b.indices.tolist()} <= set(range(5)) | set(range(10, 15))


@pytest.mark.parametrize("chain", [
    {"gain": {}, "speed": {"p": 0.5, "factor": [0.8, 1.25]}, "noise": {"snr_db": [5, 20]}, "rrc": {},
     "time_mask": {}, "freq_mask": {"width": [0, 6]}},
    {"rrc": {}, "pitch_shift": {}, "compress": {}, "time_mask": {}},
], ids=["waveform-and-log-mel-ops", "log-mel-ops-only"])
def test_both_back_ends_apply_the_same_chain_to_the_same_numbers(tmp_path, chain):
    """Clips exactly as long as a view's input: both back ends cut the same samples,
    then the shared stage augments them with the same keyed draws: bit for bit. With
    log-mel ops only, DALI computes the log-mel in its graph: the tolerance is then the
    two front ends' (1e-4 in normalised units = 0.002 dB), carried through the ops."""
    from dataio.backends.torch_pipeline import TorchSource
    from tests.shard_utils import write_dali_indexes

    cfg = DataConfig(shards=str(tmp_path), batch_size=4, num_workers=1, view_seconds=0.5)
    frontend = FrontendConfig(n_mels=32)
    aug = build_augmenter(chain, frontend, 0.5, num_views=2, pairs_per_clip=1, seed=0)
    manifest = make_shards(tmp_path, [8, 8], seconds=aug.input_samples / 16000)
    write_dali_indexes(tmp_path)
    manifest = load_manifest(tmp_path)
    place = Placement(steps=4)
    torch_views = {}
    for batch in TorchSource(cfg, manifest, aug, place).epoch(0, 0):
        torch_views.update(zip(batch.indices.tolist(), batch.views))
    dali = DaliBatches(cfg, manifest, frontend, aug, place)
    dali_views = {}
    threads = torch.get_num_threads()
    for step in range(4):
        batch = dali.next_batch(0, step)
        dali_views.update(zip(batch.indices.tolist(), batch.views))
    assert torch.get_num_threads() == threads  # the log-mel ops' one thread beside DALI is given back
    assert set(torch_views) == set(dali_views) == set(range(16))
    worst = max(float((torch_views[i] - dali_views[i]).abs().max()) for i in range(16))
    print(f"max |torch - DALI| after the chain: {worst:.2e}")
    assert worst < (1e-5 if aug.has_wave_ops else 1e-4)


def _ramp_shards(folder, seconds_list, rate=16000):
    """One shard of clips whose sample i is i / 2**15: a crop's first sample is its start."""
    import io
    import json
    import tarfile

    import soundfile as sf

    from dataio.reading.manifest import Manifest, ShardInfo
    from tests.shard_utils import write_dali_indexes

    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "shard-00000.tar", "w") as tar:
        for index, seconds in enumerate(seconds_list):
            n = int(seconds * rate)
            buf = io.BytesIO()
            sf.write(buf, (np.arange(n) / 2 ** 15).astype(np.float32), rate, format="FLAC", subtype="PCM_16")
            for ext, payload in (("flac", buf.getvalue()), ("json", json.dumps(
                    {"index": index, "labels": ["a"], "duration": seconds}).encode())):
                info = tarfile.TarInfo(f"clip{index:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    Manifest(dataset="ramp", sample_rate=rate, num_clips=len(seconds_list), shards=[ShardInfo(
        url="shard-00000.tar", count=len(seconds_list))], vocabulary=["a"], root=folder).write(folder)
    write_dali_indexes(folder)
    return load_manifest(folder)


def test_view_gap_keeps_the_two_views_apart_in_the_dali_graph(tmp_path):
    from dataio.backends.dali_pipeline import build_pipeline

    manifest = _ramp_shards(tmp_path, [1.0, 1.2, 1.5, 0.8] * 4)  # views of 0.25 s, gap 0.5 s
    cfg = DataConfig(shards=str(tmp_path), batch_size=16, num_workers=1, view_seconds=0.25, view_gap=0.5)
    aug = build_augmenter({"gain": {"db": [0.0, 0.0]}}, FrontendConfig(n_mels=32), 0.25, num_views=2,
                          pairs_per_clip=1, seed=0)
    pipe = build_pipeline(cfg, manifest, FrontendConfig(n_mels=32), aug, Placement(), device_id=None)
    gaps = []
    for _ in range(4):
        views, meta, _ = pipe.run()
        for clip, m in zip(views, meta):
            seconds = json.loads(bytes(np.array(m)).rstrip(b"\0"))["duration"]
            starts = np.round(np.array(clip)[:, 0] * 2 ** 15) / 16000
            room = seconds - 0.25
            assert starts.min() >= 0 and starts.max() <= room + 1e-3
            gaps.append((room, abs(starts[0] - starts[1])))
    assert all(gap >= min(0.5, room) - 1e-3 for room, gap in gaps)
    assert len({round(g, 3) for _, g in gaps}) > 4, "still random"


def test_log_mel_ops_beside_dali_take_one_thread_on_a_cpu_and_give_it_back():
    from dataio.backends.dali_pipeline import one_thread_beside_dali

    threads = torch.get_num_threads()
    with one_thread_beside_dali(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    with pytest.raises(KeyError), one_thread_beside_dali(torch.device("cpu")):
        raise KeyError("a failing op")
    assert torch.get_num_threads() == threads
    with one_thread_beside_dali(torch.device("meta")):  # any device but a CPU: untouched
        assert torch.get_num_threads() == threads
