"""video2dataset's webdataset shards, read in place: each `00000.tar` holds, per sample, `{key}.mp4`
(the clip), `{key}.txt` (its caption) and `{key}.json` (its metadata, not needed here).

`shard_items` lists every sample of every shard from the tar headers (tarfile reads a member's
header, then seeks over its data) and reads the captions, a few bytes each. A sample's clip is then
a `Member`: the shard's name with the offset and size of the clip's bytes, which any process reads at
random, without unpacking the shard and without reading it in order. That is what the training's
seeding needs: a sample by its global index, in whichever rank or worker process, so each one reads
only its own samples' bytes. A clip without a caption, a member cut off by a truncated shard, or a
file that is not a tar is left out and said why; a corrupt clip fails when it is decoded
(data.VideoError) and is skipped with the other unreadable videos.
"""
import io
import os
import posixpath
import tarfile
from dataclasses import dataclass

VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif")
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE  # a whole tar ends with two zero blocks


@dataclass(frozen=True)
class Member:
    """One file inside a shard: `size` bytes at `offset` of the tar file `shard`."""
    shard: str
    name: str
    offset: int
    size: int

    def __str__(self):  # what error messages name
        return f"{self.shard}:{self.name}"

    def read(self):
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) < self.size:
            raise OSError(f"{self}: the shard ends {self.size - len(data)} bytes before the end of this member")
        return data

    def open(self):
        return io.BytesIO(self.read())


def split_key(name):
    """webdataset's sample key and field of a member: "dir/000123.mp4" -> ("dir/000123", ".mp4")."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), "." + ext.lower()


def index_shard(path):
    """({key: {extension: Member}}, {key: caption}, damage) of one tar, from its headers; `damage` says
    where a truncated or damaged shard stops being readable (None for a whole one)."""
    size, fields, captions = os.path.getsize(path), {}, {}
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:  # tarfile.ReadError: not a tar
        end, damage = 0, None
        try:
            for info in tar:  # tarfile stops quietly at a cut or damaged header
                end = info.offset_data + info.size
                if not info.isfile():
                    continue
                key, ext = split_key(info.name)
                fields.setdefault(key, {})[ext] = Member(path, info.name, info.offset_data, info.size)
                if ext == ".txt" and end <= size:
                    captions[key] = tar.extractfile(info).read().decode("utf-8", errors="replace").strip()
            end = tar.offset
        except (tarfile.ReadError, EOFError, OSError) as e:
            damage = f"truncated or damaged after byte {min(end, size)} of {size} ({e})"
        f.seek(end)
        if damage is None and f.read(END_OF_ARCHIVE) != bytes(END_OF_ARCHIVE):
            damage = f"truncated or damaged: no complete member or end of archive after byte {min(end, size)} of {size}"
    return fields, captions, damage


def shard_items(paths):
    """([(Member of the clip, caption)] of every sample in the tar files `paths`, in order; what to
    warn about; how many clips were left out)."""
    items, notes, left_out = [], [], 0
    for path in paths:
        try:
            size = os.path.getsize(path)
            fields, captions, damage = index_shard(path)
        except (tarfile.ReadError, OSError) as e:
            notes.append(f"{path}: not a readable tar ({e}); left out")
            continue
        if damage:
            notes.append(f"{path}: {damage}; the samples before it are used")
        for key, members in fields.items():
            clip = next((members[ext] for ext in VIDEO_EXTENSIONS if ext in members), None)
            if clip is None:
                continue  # a sample without a clip (video2dataset keeps only the downloaded ones)
            why = "cut off by the end of the shard" if clip.offset + clip.size > size else \
                "no caption (.txt)" if key not in captions else None
            if why:
                notes.append(f"{clip}: {why}; left out")
                left_out += 1
            else:
                items.append((clip, captions[key]))
    return items, notes, left_out
