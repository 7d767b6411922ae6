"""The DALI back end (``data.backend: dali``): the same batches as the webdataset one.

A pure ``@pipeline_def`` graph: read the rank's part of the shards (with their index
files) -> the clip as the corpus stores it (:mod:`dataio.formats`): FLAC decoded,
downmixed and resampled to the manifest's rate by DALI's audio decoder; pcm16 and
logmel members read with no decoder at all, their bytes reinterpreted by the reader as
int16 samples or float16 ``[T, F]`` frames -> cut the views (random crops; short clips
padded with silence at a random offset) -> to the GPU when there is one -> then:

- a logmel corpus: the frames scaled to the features (normalised, ``[F, T]``); the
  chain's log-mel ops run on the device (``Augmenter.from_mels``);
- audio, no waveform op: spectrogram -> mel filter bank -> decibels -> normalise, in the
  graph; the chain's log-mel ops then run on the device (``Augmenter.from_mels``);
- audio, waveform ops: the graph ends with the waves, and the chain runs whole on the
  device (``Augmenter.from_waves``: waveform ops, torchaudio log-mel, log-mel ops).

pcm16 views are cut as int16 and scaled on the device (half the bytes to copy; the
numbers FLAC decoding gives). Either way each op runs once, in :mod:`dataio.augment`, on
the same keys as with the torch back end. The same ``FrontendConfig`` drives the DALI
and the torchaudio log-mel; a test holds the two to the same numbers. Pipeline
checkpointing (reader position and random state) makes ``resume=auto`` continue
mid-epoch.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from dataio.augment import Augmenter, BatchIds
from dataio.backends.batch import Batch, DataConfig, Placement
from dataio.backends.source import DataSource
from dataio.errors import DataError, ManifestError, ShardMismatch
from dataio.formats.base import MELS, WAVES
from dataio.formats.codec import ClipCodec
from dataio.frontend import FrontendConfig, analysis_window, one_torch_thread
from dataio.reading.manifest import Manifest
from dataio.reading.remote import Retry
from dataio.reading.shard_cache import localize
from dataio.schema import check

log = logging.getLogger(__name__)


def logmel_nodes(views, cfg: FrontendConfig):
    """DALI nodes turning each 1-D wave node in ``views`` into a normalised log-mel [F, T]."""
    from nvidia.dali import fn  # deferred: DALI is heavy and optional

    out = []
    for wave in views:
        spec = fn.spectrogram(wave, nfft=cfg.fft_size, window_length=cfg.win_length,
                              window_step=cfg.hop_length, window_fn=analysis_window(cfg).tolist(),
                              center_windows=True, reflect_padding=True, power=2, layout="ft")
        mel = fn.mel_filter_bank(spec, sample_rate=cfg.sample_rate, nfilter=cfg.n_mels,
                                 freq_low=cfg.f_min, freq_high=cfg.f_max or cfg.sample_rate / 2,
                                 mel_formula=cfg.mel_scale, normalize=False)
        db = fn.to_decibels(mel, multiplier=10.0, reference=1.0, cutoff_db=10 * math.log10(cfg.log_floor))
        out.append(cfg.normalise(db))
    return out


def cut_views(audio, num: int, length: int, *, group: int = 2, gap: int = 0, fill: float = 0.0):
    """``num`` random crops of ``length`` samples (or frames: time is axis 0) of a clip
    node. The crop start is u * (n - length), u ~ U(0, 1): inside the clip when it is
    long enough, a random padding offset (``fill``) when it is not. With ``gap`` (pairs of
    views, ``group`` = 2) the two starts of each pair are at least ``gap`` apart where the
    clip allows (as far apart as it allows otherwise), as :func:`dataio.backends.views.place_crops`
    places them."""
    import nvidia.dali.math as dmath  # deferred: DALI is heavy and optional
    from nvidia.dali import fn, types  # deferred: DALI is heavy and optional

    n = fn.cast(audio.shape()[0], dtype=types.FLOAT)
    room = n - length
    uniform = lambda: fn.random.uniform(range=[0.0, 1.0])  # noqa: E731
    starts = []
    for _ in range(num // group if gap else 0):
        short = fn.cast(room < 0, dtype=types.FLOAT)
        g = dmath.min(float(gap), dmath.max(room, 0.0))
        a, b = uniform() * (dmath.max(room, 0.0) - g), uniform() * (dmath.max(room, 0.0) - g)
        lo, hi = dmath.min(a, b), dmath.max(a, b) + g
        first = fn.cast(fn.random.coin_flip(), dtype=types.FLOAT)
        pair = (first * lo + (1 - first) * hi, first * hi + (1 - first) * lo)
        starts += [short * (uniform() * room) + (1 - short) * s for s in pair]
    while len(starts) < num:
        starts.append(uniform() * room)
    return [fn.slice(audio, fn.cast(s, dtype=types.INT32), length, axes=[0], out_of_bounds_policy="pad",
                     fill_values=fill) for s in starts]


def readable_shards(manifest: Manifest) -> list:
    """The manifest's shards whose tar holds every byte its DALI index points at; a
    truncated shard is left out with a warning (the DALI reader would fail on it)."""
    usable = []
    for shard in manifest.shards:
        if shard.index_file and (manifest.root / shard.index_file).is_file():
            lines = (manifest.root / shard.index_file).read_text().split("\n")[1:]
            fields = [line.split() for line in lines if line.strip()]
            if len(fields) != shard.count:
                raise ManifestError(f"shard {shard.url} of {manifest.root}: its DALI index lists {len(fields)} "
                                    f"samples, its manifest {shard.count}; the manifest does not describe its "
                                    f"shards: run `audioclr check-shards` on it, or shard the audio again")
            end = max((int(f[i + 1]) + int(f[i + 2]) for f in fields for i in range(0, len(f), 4)), default=0)
            size = (manifest.root / shard.url).stat().st_size
            if size < end:
                log.warning("leaving out truncated shard %s (%d bytes, its index needs %d)", shard.url, size, end)
                continue
        usable.append(shard)
    if not usable:
        raise ValueError(f"no readable shard in {manifest.root}")
    return usable


def build_pipeline(data: DataConfig, manifest: Manifest, frontend: FrontendConfig, augmenter: Augmenter,
                   place: Placement, *, device_id: int | None, checkpoint: str | None = None):
    """The DALI pipeline of one rank; outputs ``views`` [K*V, S] waves (the chain has
    waveform ops) or [K*V, F, T] log-mels, ``meta`` and ``info`` (padded JSON and
    source-info bytes), K = ``data.pairs_per_clip`` view sets per clip."""
    from nvidia.dali import fn, pipeline_def, types  # deferred: DALI is heavy and optional

    usable = readable_shards(manifest)
    paths = [str(manifest.root / s.url) for s in usable]
    # without index files DALI indexes the tars itself when the pipeline starts
    index_paths = [str(manifest.root / s.index_file) for s in usable] \
        if all(s.index_file for s in usable) else None
    views_per_clip = data.num_views * data.pairs_per_clip
    rank, seed = place.rank, place.seed
    codec = ClipCodec.of(manifest)
    fmt = codec.format
    member_type = getattr(types, fmt.dali_type)

    @pipeline_def(enable_checkpointing=True)
    def graph():
        member, meta = fn.readers.webdataset(
            paths=paths, index_paths=index_paths or None, ext=[codec.ext, "json"], dtypes=[member_type, types.UINT8],
            shard_id=rank, num_shards=place.world_size, random_shuffle=True, initial_fill=data.shuffle_buffer,
            seed=seed + 1, name="reader")
        info = fn.pad(fn.get_property(member, key="source_info"), fill_value=0)
        views = _views(member, codec, data, augmenter, views_per_clip)
        if device_id is not None:
            views = [v.gpu() for v in views]
        views = [fmt.dali_float(v, frontend) for v in views]
        if arrival(codec, augmenter) == MELS and fmt.is_wave:  # the log-mel computed in the graph
            views = logmel_nodes(views, frontend)
        return fn.stack(*views), fn.pad(meta, fill_value=0), info

    return graph(batch_size=data.batch_size // data.pairs_per_clip, num_threads=data.num_workers or 1,
                 device_id=device_id, seed=seed + 1000 * rank + 1, prefetch_queue_depth=data.prefetch,
                 checkpoint=checkpoint)


def arrival(codec: ClipCodec, augmenter: Augmenter) -> str:
    """How this graph's views enter the chain: as waves when the chain has waveform ops
    (only a wave format can have them), as log-mels otherwise (computed in the graph, or
    stored)."""
    return WAVES if codec.is_wave and augmenter.has_wave_ops else MELS


def _views(member, codec: ClipCodec, data: DataConfig, augmenter: Augmenter, count: int) -> list:
    """The view nodes cut from one member node, as its format reads it: samples (padded
    with silence), or ``[T, F]`` frames (padded with the log floor)."""
    rate, clip = codec.sample_rate, codec.format.dali_clip(member, codec)
    if codec.is_wave:
        return cut_views(clip, count, augmenter.input_samples, group=data.num_views,
                         gap=int(round(data.view_gap * rate)))
    return cut_views(clip, count, augmenter.mel_frames_in, group=data.num_views, fill=codec.floor_db,
                     gap=int(round(data.view_gap * rate / augmenter.frontend.hop_length)))


def _strings(t: torch.Tensor) -> list[str]:
    return [bytes(row.tolist()).rstrip(b"\0").decode() for row in t.cpu().to(torch.uint8)]


@contextmanager
def one_thread_beside_dali(device: torch.device):
    """On a CPU device DALI's threads decode the next batches while the log-mel ops run: they
    take one core instead of contending with DALI for all of them (2 cores, the demo's log-mel
    ops, `audioclr bench data`: 2,276 clips/s instead of 1,711). Not for a chain with waveform
    ops: there the stage computes the log-mel too, which gains more from the threads (1,200
    clips/s instead of 910)."""
    if device.type != "cpu":
        yield
        return
    with one_torch_thread():
        yield


class DaliBatches:
    """Log-mel :class:`Batch` es of one rank from an endless DALI pipeline
    (``next_batch(epoch, step)``), with ``state()`` for checkpoints (DALI's own pipeline
    checkpoint)."""

    def __init__(self, data: DataConfig, manifest: Manifest, frontend: FrontendConfig, augmenter: Augmenter,
                 place: Placement, checkpoint: str | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # deferred: DALI is heavy and optional

        self.data, self.manifest, self.augmenter, self.place = data, manifest, augmenter, place
        device = place.device
        device_id = device.index or 0 if device.type == "cuda" else None
        self.arrives = arrival(ClipCodec.of(manifest), augmenter.to(device))
        pipe = build_pipeline(data, manifest, frontend, augmenter, place, device_id=device_id, checkpoint=checkpoint)
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

    def _meta(self, text: str, source: str) -> dict:
        """A clip's JSON member, parsed, with an int ``index``; DataError naming the member if not."""
        try:
            meta = json.loads(text)
            meta["index"] = int(meta["index"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"malformed clip JSON {source} ({err!r}): list the broken members with "
                            f"`audioclr check-shards {self.manifest.root}` and re-shard them") from None
        if not 0 <= meta["index"] < self.manifest.num_clips:  # a memory bank is indexed by it
            raise ShardMismatch(f"clip {source} has index {meta['index']}, outside the 0..{self.manifest.num_clips - 1}"
                                f" of the num_clips={self.manifest.num_clips} the manifest of {self.manifest.root} "
                                f"lists: it does not describe its shards; run `audioclr check-shards` on it")
        return meta

    def next_batch(self, epoch: int, step: int) -> Batch:
        try:
            out = next(self.iterator)[0]
        except RuntimeError as err:
            raise self._failure(err) from None
        k, v = self.data.pairs_per_clip, self.data.num_views
        device = self.place.device
        raw = out["views"].to(device, non_blocking=True)
        raw = raw.reshape(-1, k * v, *raw.shape[2:]).reshape(-1, v, *raw.shape[2:])  # [clips*K, V, ...]
        metas = [self._meta(text, src) for text, src in zip(_strings(out["meta"]), _strings(out["info"]))]
        indices = torch.tensor([m["index"] for m in metas], device=device).repeat_interleave(k)
        ids = BatchIds(indices=indices, draws=torch.arange(k, device=device).repeat(len(metas)), epoch=epoch,
                       step=step, rank=self.place.rank)
        if self.arrives == WAVES:
            views = self.augmenter.augment(raw, ids, WAVES)
        else:
            with one_thread_beside_dali(device):
                views = self.augmenter.augment(raw, ids, self.arrives)
        labels = np.asarray([self.manifest.label_target(m.get("labels") or []) for m in metas])
        keys = [s.rsplit(":", 1)[-1].rsplit(".", 1)[0] for s in _strings(out["info"])]
        short = sum(float(m.get("duration", 0.0)) < self.data.view_seconds for m in metas)
        return Batch(views=views, labels=torch.from_numpy(np.repeat(labels, k, axis=0)).to(device),
                     indices=indices, keys=[key for key in keys for _ in range(k)], short=short * k)


class DaliSource(DataSource):
    """The DALI back end: one endless pipeline; its position is DALI's pipeline checkpoint
    (its readers' split of the shards, so it does not hold at another world size)."""

    name = "dali"
    position_holds_at_any_world_size = False

    @classmethod
    def check(cls, cfg: DataConfig) -> None:
        check(not (cfg.view_gap and cfg.num_views != 2), "data.view_gap",
              "with backend dali, a gap between views needs num_views 2")
        check(not cfg.resampled, "data.resampled", "needs backend torch (DALI's reader splits the shards itself)")
        check(cfg.short_clips != "skip", "data.short_clips",
              "'skip' needs backend torch (a DALI batch cannot drop samples); use 'pad'")
        check(not cfg.sources, "data.sources", "mixing corpora needs backend torch")

    @classmethod
    def open(cls, cfg: DataConfig, manifest: Manifest, frontend: FrontendConfig, augmenter: Augmenter,
             place: Placement, state=None) -> DaliSource:
        if manifest.remote:  # DALI's readers open local files: a node-local copy
            manifest = localize(manifest, cfg.cache_dir, cfg.cache_gb, Retry.of(cfg))
        return cls(cfg, manifest, frontend, augmenter, place, state=state)

    def __init__(self, cfg: DataConfig, manifest: Manifest, frontend: FrontendConfig, augmenter: Augmenter,
                 place: Placement, state: str | None = None):
        self.steps = place.steps
        self.batches = DaliBatches(cfg, manifest, frontend, augmenter, place, checkpoint=state)

    def epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        for step in range(start_step, self.steps):
            yield self.batches.next_batch(epoch, step)

    def state(self) -> str:
        return self.batches.state()


def numpy_logmel(waves: np.ndarray, frontend: FrontendConfig, device: str = "cpu") -> np.ndarray:
    """DALI log-mels of float32 waves [N, S], computed on the CPU or (``device="gpu"``)
    GPU 0, for parity tests and benchmarks."""
    from nvidia.dali import fn, pipeline_def  # deferred: DALI is heavy and optional

    @pipeline_def
    def graph():
        wave = fn.external_source(name="wave")
        return logmel_nodes([wave.gpu() if device == "gpu" else wave], frontend)[0]

    pipe = graph(batch_size=len(waves), num_threads=1, device_id=0 if device == "gpu" else None)
    pipe.build()
    pipe.feed_input("wave", [w.astype(np.float32) for w in waves])
    (out,) = pipe.run()
    if device == "gpu":
        out = out.as_cpu()
    return np.stack([np.array(t) for t in out])
