"""Tiny hand-made shards for data tests (independent of the shard writer)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf

from dataio.reading.manifest import Manifest, ShardInfo


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_shards(folder: Path, counts: list[int], seconds: float = 1.2, rate: int = 16000,
                classes: int = 3, seed: int = 0, folds: bool = True, noise: float = 0.01) -> Manifest:
    """Shards with ``counts[i]`` clips in shard i; clip ``index`` runs 0..N-1 and each
    clip is a tone whose frequency encodes its class (label ``c{index % classes}``), in
    fold ``index % 2 + 1`` (no fold unless ``folds``), under white noise of std ``noise``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    index, shards = 0, []
    for s, count in enumerate(counts):
        url = f"shard-{s:05d}.tar"
        with tarfile.open(folder / url, "w") as tar:
            for _ in range(count):
                t = np.arange(int(seconds * rate)) / rate
                wave = 0.3 * np.sin(2 * np.pi * (200 + 300 * (index % classes)) * t) \
                    + noise * rng.standard_normal(len(t))
                buf = io.BytesIO()
                sf.write(buf, wave.astype(np.float32), rate, format="FLAC", subtype="PCM_16")
                key = f"clip{index:05d}"
                meta = {"index": index, "dataset": "tiny", "labels": [f"c{index % classes}"],
                        "split": "train", "duration": seconds}
                if folds:
                    meta["fold"] = index % 2 + 1
                _add(tar, key + ".flac", buf.getvalue())
                _add(tar, key + ".json", json.dumps(meta).encode())
                index += 1
        shards.append(ShardInfo(url=url, count=count, bytes=(folder / url).stat().st_size))
    manifest = Manifest(dataset="tiny", sample_rate=rate, num_clips=index, shards=shards,
                        vocabulary=[f"c{i}" for i in range(classes)], root=folder)
    manifest.write(folder)
    return manifest


def write_dali_indexes(folder: Path) -> None:
    """DALI index files for hand-made shards (the shard writer makes its own)."""
    from dataio.writing.tar_writer import write_dali_index

    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for shard in manifest["shards"]:
        lines, current, members = [], None, []
        with tarfile.open(folder / shard["url"]) as tar:
            for info in tar.getmembers():
                key, ext = info.name.rsplit(".", 1)
                if key != current and members:
                    lines.append(" ".join(members))
                    members = []
                current = key
                members.append(f"{ext} {info.offset_data} {info.size} {info.name}")
        lines.append(" ".join(members))
        shard["index_file"] = shard["url"].replace(".tar", ".idx")
        write_dali_index(folder / shard["index_file"], lines)
    manifest_path.write_text(json.dumps(manifest))


def corrupt_member(shard: Path, which: int = 2, ext: str = "flac") -> str:
    """Overwrite the payload of the ``which``-th ``.ext`` member with noise (size kept);
    returns the member's key."""
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith("." + ext)][which]
    data = bytearray(shard.read_bytes())
    noise = np.random.default_rng(0).integers(0, 255, member.size, dtype=np.uint8).tobytes()
    data[member.offset_data:member.offset_data + member.size] = noise
    shard.write_bytes(bytes(data))
    return member.name.rsplit(".", 1)[0]


def rewrite_members(folder: Path, change) -> None:
    """Rewrite every shard of ``folder`` with each member's payload replaced by
    ``change(name, payload)``; the manifest's byte counts and the DALI indexes follow."""
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(tar_path, "w") as tar:
            for name, payload in members:
                _add(tar, name, change(name, payload))
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["bytes"] = (folder / shard["url"]).stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    write_dali_indexes(folder)
