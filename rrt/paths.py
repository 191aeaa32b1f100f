"""Run directories on a local disk or on Cloud Storage (`gs://bucket/run`): the one path layer, `etils.epath`.

Everything a run writes into its workdir goes through `epath.Path`: the Orbax checkpoints (Orbax uses epath itself,
and tensorstore's own gcs driver for the array bytes), metrics.jsonl and the TensorBoard events (rrt.metrics_log),
train_config.json, rrt_model.json and the tokenizer (rrt.train), the token cache (rrt.data.tokens) and the workdir
lock (rrt.workdir_lock). A `gs://` path stays a URL (os.path would turn `gs://b/r` into the local directory
`gs:/b/r` on every host); a local path is made absolute, so that nothing depends on the current directory.

What an object store does not do, and what rrt does instead:
  * no append: metrics.jsonl and the TensorBoard event file are rewritten whole at each flush (one object upload
    is all or nothing, so a kill leaves the previous version, never a partial line);
  * no rename of a file into place: a single object write is already atomic, so `write_atomic` writes the object
    directly (locally it writes a temporary file and renames it);
  * no flock: the workdir lock is an object with a heartbeat that expires (rrt.workdir_lock);
  * no mmap: the token cache is copied to a local directory and memory-mapped there (`local_copy_dir`).

epath reaches gs:// through TensorFlow's gfile when TensorFlow is installed, else through fsspec + gcsfs (the TPU pod
setup installs gcsfs, as does the `gcs` extra; see docs/LAUNCHING.md).
"""

import os
import tempfile
import urllib.parse

from etils import epath

SCHEMES = ("gs",)  # what a workdir URL may be (the schemes rrt has been tested with, on a fake bucket)


def is_url(path) -> bool:
    """True for `scheme://...` paths, which no os.path function, flock or mmap reaches."""
    return "://" in os.fspath(path)


def workdir_path(path) -> epath.Path:
    """The epath of a run directory: a `gs://bucket/dir` URL as it is, a local path made absolute (`~` expanded).
    Any other URL scheme is an error naming it."""
    path = os.fspath(path)
    if is_url(path):
        scheme, _, rest = path.partition("://")
        if scheme not in SCHEMES:
            raise ValueError(f"workdir {path!r}: unsupported URL scheme {scheme}:// (supported: gs://)")
        if not rest.split("/", 1)[0]:
            raise ValueError(f"workdir {path!r} names no bucket (gs://bucket/dir)")
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.path.expanduser(path)))


def write_atomic(path: epath.Path, data: str | bytes) -> None:
    """Writes `path` so that no reader (or a kill) ever sees part of it: an object upload on a URL, a temporary
    file renamed into place on a local disk."""
    path = epath.Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    if is_url(path):
        with path.open(mode) as f:
            f.write(data)
        return
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    with tmp.open(mode) as f:
        f.write(data)
    tmp.replace(path)


def local_copy_dir(url) -> str:
    """The local directory that mirrors the remote directory `url` (for files that must be memory-mapped):
    $RRT_LOCAL_CACHE (default <tmp>/rrt_remote_cache) / <scheme> / <bucket> / <path>."""
    parsed = urllib.parse.urlparse(os.fspath(url))
    root = os.environ.get("RRT_LOCAL_CACHE") or os.path.join(tempfile.gettempdir(), "rrt_remote_cache")
    return os.path.join(root, parsed.scheme, parsed.netloc, parsed.path.strip("/"))


def download_dir(url) -> str:
    """A local copy of the remote directory `url` (every file below it, fetched again each call so that a copy never
    goes stale), at `local_copy_dir(url)`. For what needs a local directory: a tokenizer's files."""
    src = epath.Path(url)
    if not src.is_dir():
        raise FileNotFoundError(f"{url}: no such directory")
    dst = local_copy_dir(url)
    for d, _, files in src.walk():
        rel = os.path.relpath(os.fspath(d), os.fspath(src))
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in files:
            write_local = os.path.join(dst, rel, name)
            tmp = f"{write_local}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write((epath.Path(d) / name).read_bytes())
            os.replace(tmp, write_local)
    return dst


def orbax_path(path) -> str:
    """What Orbax is given: a URL as it is, a local path made absolute."""
    return os.fspath(path) if is_url(path) else os.path.abspath(os.fspath(path))
