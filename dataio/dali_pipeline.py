"""The DALI back end (``data.backend: dali``): the same batches as the webdataset one.

A pure ``@pipeline_def`` graph: read the rank's part of the shards (with their index
files) -> decode FLAC, downmix, resample to the manifest's rate -> cut the views (random
crops with a random gain; short clips zero-padded at a random offset) -> to the GPU when
there is one -> spectrogram -> mel filter bank -> decibels -> normalise. The same
``FrontendConfig`` drives this graph and the torchaudio front end; a test holds the two
to the same log-mels. Pipeline checkpointing (reader position and random state) makes
``resume=auto`` continue mid-epoch.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch

from dataio.frontend import FrontendConfig
from dataio.manifest import Manifest
from dataio.pipeline import Batch, DataConfig, DataError

log = logging.getLogger(__name__)


def periodic_hann(length: int) -> list[float]:
    """The periodic Hann window torchaudio uses (DALI's default differs)."""
    return torch.hann_window(length, periodic=True, dtype=torch.float64).tolist()


def logmel_nodes(views, cfg: FrontendConfig):
    """DALI nodes turning each 1-D wave node in ``views`` into a normalised log-mel [F, T]."""
    from nvidia.dali import fn

    out = []
    for wave in views:
        spec = fn.spectrogram(wave, nfft=cfg.fft_size, window_length=cfg.win_length,
                              window_step=cfg.hop_length, window_fn=periodic_hann(cfg.win_length),
                              center_windows=True, reflect_padding=True, power=2, layout="ft")
        mel = fn.mel_filter_bank(spec, sample_rate=cfg.sample_rate, nfilter=cfg.n_mels,
                                 freq_low=cfg.f_min, freq_high=cfg.f_max or cfg.sample_rate / 2,
                                 mel_formula=cfg.mel_scale, normalize=False)
        db = fn.to_decibels(mel, multiplier=10.0, reference=1.0, cutoff_db=10 * math.log10(cfg.log_floor))
        out.append((db - cfg.norm_mean) / cfg.norm_std)
    return out


def cut_views(audio, num: int, length: int, gain_db: float):
    """``num`` random crops of ``length`` samples of a decoded clip node, each with a gain
    uniform in +-``gain_db`` dB. The crop start is u * (n - length), u ~ U(0, 1): inside
    the clip when it is long enough, a random zero-padding offset when it is not."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    n = fn.cast(audio.shape(), dtype=types.FLOAT)
    views = []
    for _ in range(num):
        start = fn.cast(fn.random.uniform(range=[0.0, 1.0]) * (n - length), dtype=types.INT32)
        crop = fn.slice(audio, start, length, axes=[0], out_of_bounds_policy="pad")
        if gain_db > 0:
            crop = crop * dmath.pow(10.0, fn.random.uniform(range=[-gain_db, gain_db]) / 20.0)
        views.append(crop)
    return views


def readable_shards(manifest: Manifest) -> list:
    """The manifest's shards whose tar holds every byte its DALI index points at; a
    truncated shard is left out with a warning (the DALI reader would fail on it)."""
    usable = []
    for shard in manifest.shards:
        if shard.index_file and (manifest.root / shard.index_file).is_file():
            lines = (manifest.root / shard.index_file).read_text().split("\n")[1:]
            fields = [line.split() for line in lines if line.strip()]
            end = max((int(f[i + 1]) + int(f[i + 2]) for f in fields for i in range(0, len(f), 4)), default=0)
            size = (manifest.root / shard.url).stat().st_size
            if size < end:
                log.warning("leaving out truncated shard %s (%d bytes, its index needs %d)", shard.url, size, end)
                continue
        usable.append(shard)
    if not usable:
        raise ValueError(f"no readable shard in {manifest.root}")
    return usable


def build_pipeline(data: DataConfig, manifest: Manifest, frontend: FrontendConfig, *, rank: int,
                   world_size: int, seed: int, device_id: int | None, checkpoint: str | None = None):
    """The DALI pipeline of one rank; outputs ``views`` [K*V, F, T], ``meta`` and ``info``
    (padded JSON and source-info bytes), K = ``data.pairs_per_clip`` view sets per clip."""
    from nvidia.dali import fn, pipeline_def, types

    usable = readable_shards(manifest)
    paths = [str(manifest.root / s.url) for s in usable]
    # without index files DALI indexes the tars itself when the pipeline starts
    index_paths = [str(manifest.root / s.index_file) for s in usable] \
        if all(s.index_file for s in usable) else None
    length = int(round(data.view_seconds * manifest.sample_rate))
    views_per_clip = data.num_views * data.pairs_per_clip

    @pipeline_def(enable_checkpointing=True)
    def graph():
        flac, meta = fn.readers.webdataset(
            paths=paths, index_paths=index_paths or None, ext=["flac", "json"], shard_id=rank,
            num_shards=world_size, random_shuffle=True, initial_fill=data.shuffle_buffer,
            seed=seed + 1, name="reader")
        info = fn.pad(fn.get_property(flac, key="source_info"), fill_value=0)
        audio, _ = fn.decoders.audio(flac, dtype=types.FLOAT, downmix=True,
                                     sample_rate=manifest.sample_rate)
        views = cut_views(audio, views_per_clip, length, data.gain_db)
        if device_id is not None:
            views = [v.gpu() for v in views]
        return fn.stack(*logmel_nodes(views, frontend)), fn.pad(meta, fill_value=0), info

    return graph(batch_size=data.batch_size // data.pairs_per_clip, num_threads=data.num_workers or 1,
                 device_id=device_id, seed=seed + 1000 * rank + 1, prefetch_queue_depth=2,
                 checkpoint=checkpoint)


def _strings(t: torch.Tensor) -> list[str]:
    return [bytes(row.tolist()).rstrip(b"\0").decode() for row in t.cpu().to(torch.uint8)]


class DaliBatches:
    """Endless log-mel :class:`Batch` es of one rank from a DALI pipeline, with
    ``state()`` for checkpoints (DALI's own pipeline checkpoint)."""

    def __init__(self, data: DataConfig, manifest: Manifest, frontend: FrontendConfig, *, rank: int,
                 world_size: int, seed: int, device: torch.device, checkpoint: str | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.data, self.manifest, self.frontend, self.device = data, manifest, frontend, device
        device_id = device.index or 0 if device.type == "cuda" else None
        pipe = build_pipeline(data, manifest, frontend, rank=rank, world_size=world_size, seed=seed,
                              device_id=device_id, checkpoint=checkpoint)
        try:  # the iterator decodes its first batch right away
            self.iterator = DALIGenericIterator([pipe], ["views", "meta", "info"])
        except RuntimeError as err:
            raise self._failure(err) from None

    def _failure(self, err: RuntimeError) -> DataError:
        lines = str(err).splitlines() or ["unknown error"]
        reason = next((ln for ln in lines if "ailed" in ln), lines[0]).strip()
        return DataError(
            f"DALI stopped on a clip of {self.manifest.root} it could not read ({reason}). DALI cannot "
            f"skip a broken member: list the broken ones with `audioclr check-shards {self.manifest.root}` "
            f"and re-shard them, or train with data.backend=torch, which skips and counts such clips")

    def state(self) -> str:
        return self.iterator.checkpoints()[0]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        try:
            out = next(self.iterator)[0]
        except RuntimeError as err:
            raise self._failure(err) from None
        k, v = self.data.pairs_per_clip, self.data.num_views
        views = out["views"]
        views = views.reshape(-1, k, v, *views.shape[-2:]).reshape(-1, v, 1, *views.shape[-2:])
        if self.frontend.channels > 1:
            views = views.expand(-1, -1, self.frontend.channels, -1, -1)
        metas = [json.loads(s) for s in _strings(out["meta"])]
        labels = np.asarray([self.manifest.label_target(m.get("labels") or []) for m in metas])
        keys = [s.rsplit(":", 1)[-1].rsplit(".", 1)[0] for s in _strings(out["info"])]
        short = sum(float(m.get("duration", 0.0)) < self.data.view_seconds for m in metas)
        rep = lambda xs: [x for x in xs for _ in range(k)]  # noqa: E731
        return Batch(views=views.to(self.device, non_blocking=True),
                     labels=torch.from_numpy(np.repeat(labels, k, axis=0)).to(self.device),
                     indices=torch.tensor(rep([int(m["index"]) for m in metas]), device=self.device),
                     keys=rep(keys), short=short * k)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def numpy_logmel(waves: np.ndarray, frontend: FrontendConfig) -> np.ndarray:
    """DALI log-mels of float32 waves [N, S] (CPU), for parity tests and benchmarks."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def
    def graph():
        wave = fn.external_source(name="wave")
        return logmel_nodes([wave], frontend)[0]

    pipe = graph(batch_size=len(waves), num_threads=1, device_id=None)
    pipe.build()
    pipe.feed_input("wave", [w.astype(np.float32) for w in waves])
    (out,) = pipe.run()
    return np.stack([np.array(t) for t in out])
