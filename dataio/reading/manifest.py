"""Shard manifests and the splitting of shards over ranks and loader workers.

A shard folder holds WebDataset tars (``KEY.flac``, ``KEY.pcm`` or ``KEY.mel``, as
``clip_format`` says (see :mod:`dataio.formats`), + ``KEY.json``), one DALI index file
per tar and ``manifest.json``::

    {"format": 1, "dataset": "demo", "sample_rate": 16000, "num_clips": 400,
     "clip_format": "flac", "vocabulary": ["bell", ...], "multi_label": false,
     "shards": [{"url": "shard-00000.tar", "count": 50, "bytes": 123456,
                 "index_file": "shard-00000.idx"}, ...]}

A ``logmel`` corpus also records the front end its log-mels were computed with
(``"frontend": {"sample_rate": 16000, "win_ms": 25.0, ...}``). A manifest without
``clip_format`` is a FLAC corpus.

Shard urls are relative to the manifest's folder. The per-clip JSON is
``{"index", "dataset", "labels", "split", "fold", "duration"}`` where ``index`` is the
clip's position in the whole dataset (0..num_clips-1), plus ``"subset"`` where a dataset
has named subsets (AudioSet's segment lists, FSDnoisy18k's clean / noisy parts).
``vocabulary`` is in the dataset's official label order where it has one; with
``multi_label`` the batches carry multi-hot label vectors over it. A corpus whose folds
were named (kits, speakers, sites) numbers them 1..N in the clip JSON and keeps the names
in ``"fold_names": {"1": "Audiophob", ...}`` (absent when the folds are plain numbers).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataio.atomic import write_text_atomically
from dataio.errors import ManifestError, RemoteError
from dataio.formats import FORMATS, ClipFormat, clip_format
from dataio.reading.remote import Retry, join, read_bytes, shown, sizes

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass
class ShardInfo:
    url: str
    count: int
    bytes: int = 0
    index_file: str | None = None
    source: int = 0  # which of data.sources it belongs to


@dataclass(frozen=True)
class SourceInfo:
    """One corpus of a mixed run: its name, its share of the clips drawn, and where its
    clip indices start in the run's numbering."""

    name: str
    weight: float
    offset: int
    num_clips: int


@dataclass
class Manifest:
    dataset: str
    sample_rate: int
    num_clips: int
    shards: list[ShardInfo]
    vocabulary: list[str] = field(default_factory=list)
    multi_label: bool = False
    rejected: dict = field(default_factory=dict)  # {"clips": n, "reasons": {kind: n}, "list": file}
    root: Path | str = Path(".")  # a folder, or the URL of one (str)
    sources: list[SourceInfo] = field(default_factory=list)  # several corpora (combine_manifests)
    clip_format: str = "flac"  # what the members hold: flac, pcm16 or logmel (dataio.formats)
    frontend: dict = field(default_factory=dict)  # logmel: the front end the log-mels were computed with
    fold_names: dict[int, str] = field(default_factory=dict)  # fold number -> its name, where folds were named
    _label_ids: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._label_ids = {name: i for i, name in enumerate(self.vocabulary)}

    @property
    def remote(self) -> bool:
        return isinstance(self.root, str) and "://" in self.root

    @property
    def format(self) -> ClipFormat:
        """What its members hold (:mod:`dataio.formats`)."""
        return clip_format(self.clip_format)

    @property
    def where(self) -> str:
        """The folder or URL, fit for a message (no credentials, no query string)."""
        if self.remote:
            return shown(self.root)
        return str(self.root)

    def shard_paths(self) -> list:
        """Each shard's path (local) or URL (str, remote); a combined manifest's shards
        carry their whole location."""
        if self.sources:
            return [s.url if "://" in s.url else Path(s.url) for s in self.shards]
        if self.remote:
            return [join(self.root, s.url) for s in self.shards]
        return [self.root / s.url for s in self.shards]

    def index_offset(self, shard: int) -> int:
        """Added to the clip indices of ``shard`` so that clips of different corpora never
        share one (memory banks and augmentation keys are indexed by it)."""
        return self.sources[self.shards[shard].source].offset if self.sources else 0

    def first_shards(self, clips: int) -> Manifest:
        """The same corpus cut to its first shards (in the manifest's order) that hold at
        least ``clips`` clips, or all of it: a bounded sample read whole shard by shard."""
        kept, total = [], 0
        for shard in self.shards:
            if total >= clips:
                break
            kept.append(shard)
            total += shard.count
        return dataclasses.replace(self, shards=kept, num_clips=total)

    def clips_of(self, shard: int) -> int:
        """How many clips the corpus of ``shard`` holds: its clip JSON indices run 0..n-1."""
        return self.sources[self.shards[shard].source].num_clips if self.sources else self.num_clips

    def label_id(self, label: str) -> int:
        """Position of ``label`` in the vocabulary (-1 if absent)."""
        return self._label_ids.get(label, -1)

    def label_target(self, names: list[str]):
        """A clip's training label: for single-label data the id of its first label (-1 if
        none); for multi-label data a multi-hot float32 vector over the vocabulary."""
        if not self.multi_label:
            return self.label_id(names[0]) if names else -1
        target = np.zeros(len(self.vocabulary), dtype=np.float32)
        ids = [self.label_id(n) for n in names]
        target[[i for i in ids if i >= 0]] = 1.0
        return target

    def to_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "dataset": self.dataset,
            "sample_rate": self.sample_rate,
            "num_clips": self.num_clips,
            "clip_format": self.clip_format,
            **({"frontend": self.frontend} if self.frontend else {}),
            "vocabulary": self.vocabulary,
            "multi_label": self.multi_label,
            "rejected": self.rejected,
            **({"fold_names": {str(k): v for k, v in sorted(self.fold_names.items())}} if self.fold_names else {}),
            "shards": [
                {"url": s.url, "count": s.count, "bytes": s.bytes, "index_file": s.index_file}
                for s in self.shards
            ],
        }

    def write(self, folder: str | Path) -> Path:
        """Write ``manifest.json`` atomically into ``folder``."""
        return write_text_atomically(Path(folder) / MANIFEST_NAME, json.dumps(self.to_json(), indent=1))


def load_manifest(folder: str | Path, check_files: bool = True, retry=None) -> Manifest:
    """Read ``folder/manifest.json`` (``folder`` may be a URL, read with ``retry``, see
    :mod:`dataio.reading.remote`); with ``check_files`` every shard of a local folder must exist."""
    if "://" in str(folder):
        return _load_remote_manifest(str(folder), retry, check_files)
    folder = Path(folder)
    path = folder / MANIFEST_NAME if folder.is_dir() or not folder.suffix else folder
    if not path.is_file():
        raise ManifestError(f"no shard manifest at {path}: write shards with `audioclr shard` "
                            f"or `audioclr demo-corpus` first")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"malformed manifest {path}: not UTF-8 text (byte {err.start}); "
                            f"it is damaged: write the shards again or restore it") from None
    except OSError as err:
        raise ManifestError(f"cannot read the manifest {path}: {err.strerror or err}") from None
    manifest = parse_manifest(text, path.parent, str(path))
    if check_files:
        missing = [str(p) for p in manifest.shard_paths() if not p.is_file()]
        if missing:
            listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ManifestError(f"manifest {path} lists shards that do not exist: {listed}")
    return manifest


def _load_remote_manifest(url: str, retry=None, check_files: bool = True) -> Manifest:
    """The manifest of a folder URL; with ``check_files`` every shard it lists must be
    there at the size it records (one HEAD or listing each, no download)."""
    folder = url.rsplit("/", 1)[0] if url.endswith(".json") else url.rstrip("/")
    where = url if url.endswith(".json") else join(folder, MANIFEST_NAME)
    try:
        text = read_bytes(where, retry or Retry()).decode("utf-8")
    except RemoteError as err:
        raise ManifestError(f"no shard manifest at {err}") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"malformed manifest {shown(where)}: {err!r}") from None
    manifest = parse_manifest(text, folder, shown(where))
    if check_files:
        found = sizes(manifest.shard_paths(), (retry or Retry()).timeout)
        wrong = [f"{s.url} ({'not there' if found[u] is None else f'{found[u]} bytes, the manifest says {s.bytes}'})"
                 for s, u in zip(manifest.shards, manifest.shard_paths())
                 if u in found and (found[u] is None or (s.bytes and found[u] is not None and found[u] != s.bytes))]
        if wrong:
            listed = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
            raise ManifestError(f"manifest {shown(where)} does not match its shards: {listed}")
    return manifest


def parse_manifest(text: str, root: Path | str, name: str) -> Manifest:
    """A manifest from its JSON ``text``; ``root`` is where its shard names point into."""
    path = name
    try:
        raw = json.loads(text)
        shards = [ShardInfo(url=s["url"], count=int(s["count"]), bytes=int(s.get("bytes", 0)),
                            index_file=s.get("index_file")) for s in raw["shards"]]
        manifest = Manifest(dataset=raw["dataset"], sample_rate=int(raw["sample_rate"]),
                            num_clips=int(raw["num_clips"]), shards=shards,
                            vocabulary=list(raw.get("vocabulary", [])),
                            multi_label=bool(raw.get("multi_label", False)),
                            rejected=dict(raw.get("rejected") or {}), root=root,
                            clip_format=str(raw.get("clip_format", "flac")), frontend=dict(raw.get("frontend") or {}),
                            fold_names={int(k): str(v) for k, v in dict(raw.get("fold_names") or {}).items()})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ManifestError(f"malformed manifest {path}: {err!r}") from err
    _check_format(manifest, path)
    if sum(s.count for s in shards) != manifest.num_clips:
        raise ManifestError(f"manifest {path}: shard counts add up to "
                            f"{sum(s.count for s in shards)}, not num_clips={manifest.num_clips}")
    return manifest


def _check_format(manifest: Manifest, path: str) -> None:
    """A clip format this version reads, with what its format needs recorded (a mel
    format: its front end)."""
    if manifest.clip_format not in FORMATS:
        raise ManifestError(f"manifest {path}: clip_format {manifest.clip_format!r} is not one of "
                            f"{', '.join(FORMATS)} (written by a newer audioclr, or edited?)")
    problem = manifest.format.manifest_problem(manifest.frontend)
    if problem:
        raise ManifestError(f"manifest {path}: {problem}")


@dataclass(frozen=True)
class WorkerSplit:
    """What one loader worker of one rank reads.

    ``shards``: the shard ids it opens; ``sample_stride``/``sample_offset``: of the
    samples in those shards (in reading order) it keeps every ``sample_stride``-th,
    starting at ``sample_offset``. With enough shards the split is by shard (stride 1);
    with fewer shards than workers every worker reads the rank's shards and keeps its
    share of the samples, so no sample is seen twice either way. ``order_key``: who
    shuffles the shards alike each pass ((rank, worker) for a reader alone on its
    shards, (rank, 0) for a rank's workers sharing them, (0, 0) for ranks sharing them):
    readers that split the samples of the same shards must read them in one order.
    """

    shards: tuple[int, ...]
    sample_stride: int = 1
    sample_offset: int = 0
    order_key: tuple[int, int] = (0, 0)


def split_for_reader(shard_order: list[int], rank: int, world_size: int, worker: int,
                     num_workers: int) -> WorkerSplit:
    """What loader ``worker`` of ``rank`` reads of the epoch's shards (``shard_order``, the
    same on every rank). With at least one shard per rank the ranks split the shards and
    their workers split those; with fewer shards than ranks every reader reads all of
    them, in one shared order, and keeps every (ranks x workers)-th sample: either way
    each clip is read once per pass and no rank is left without data."""
    if len(shard_order) >= world_size:
        split = split_for_worker(shard_order[rank::world_size], worker, num_workers)
        return dataclasses.replace(split, order_key=(rank, worker if split.sample_stride == 1 else 0))
    return WorkerSplit(tuple(shard_order), sample_stride=world_size * num_workers,
                       sample_offset=rank * num_workers + worker, order_key=(0, 0))


def split_for_worker(rank_shards: list[int], worker: int, num_workers: int) -> WorkerSplit:
    if num_workers <= 1:
        return WorkerSplit(tuple(rank_shards))
    if len(rank_shards) >= num_workers:
        return WorkerSplit(tuple(rank_shards[worker::num_workers]))
    return WorkerSplit(tuple(rank_shards), sample_stride=num_workers, sample_offset=worker)


def combine_manifests(parts: list[tuple[str, float, Manifest]]) -> Manifest:
    """One manifest over several corpora ((name, weight, manifest) each): their shards with
    whole locations, clip indices numbered on (each corpus from the sum of those before),
    the union of their label vocabularies."""
    rates = {m.sample_rate for _, _, m in parts}
    if len(rates) > 1:
        raise ManifestError("data.sources: the corpora have different sample rates ("
                            + ", ".join(f"{n}: {m.sample_rate} Hz" for n, _, m in parts) + "); re-shard them "
                            "at one rate")
    kinds = {(m.clip_format, json.dumps(m.frontend, sort_keys=True)) for _, _, m in parts}
    if len(kinds) > 1:
        raise ManifestError("data.sources: the corpora are in different clip formats ("
                            + ", ".join(f"{n}: {m.clip_format}" for n, _, m in parts) + ", or log-mels of "
                            "different front ends); bring them to one with `audioclr shard convert`")
    shards, sources, vocabulary, offset = [], [], [], 0
    for i, (name, weight, m) in enumerate(parts):
        for info, where in zip(m.shards, m.shard_paths()):
            index = None
            if info.index_file and not m.remote:
                index = str(Path(m.root) / info.index_file)
            shards.append(ShardInfo(url=str(where), count=info.count, bytes=info.bytes, index_file=index, source=i))
        sources.append(SourceInfo(name=name, weight=float(weight), offset=offset, num_clips=m.num_clips))
        offset += m.num_clips
        vocabulary += [v for v in m.vocabulary if v not in vocabulary]
    first = parts[0][2]
    return Manifest(dataset="+".join(n for n, _, _ in parts), sample_rate=first.sample_rate, num_clips=offset,
                    shards=shards, vocabulary=vocabulary, multi_label=any(m.multi_label for _, _, m in parts),
                    root=first.root, sources=sources, clip_format=first.clip_format, frontend=first.frontend)


def load_sources(sources: list[dict], retry=None) -> Manifest:
    """The manifests of ``data.sources``, combined; names default to each manifest's dataset
    (numbered when two corpora share one)."""
    parts, names = [], set()
    for i, source in enumerate(sources):
        m = load_manifest(source["shards"], retry=retry)
        name = str(source.get("name") or m.dataset or f"source{i}")
        if name in names:
            name = f"{name}_{i}"
        names.add(name)
        parts.append((name, source.get("weight", 1.0), m))
    return combine_manifests(parts)
