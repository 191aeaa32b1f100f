"""A fake Cloud Storage for tests, offline: every `gs://bucket/path` is the local file <root>/bucket/path.

`install(root)` routes, in this process, everything rrt and Orbax do with a gs:// path to that directory:
  * etils.epath's gs:// backend (what rrt.paths, rrt.metrics_log, rrt.workdir_lock, rrt.data.tokens, the TensorBoard
    writer and Orbax's own file operations use): an object-store-like backend over the local directory that refuses
    appending (GCS objects cannot be appended to), creates parent "directories" on write (GCS has none), and maps
    paths in and out;
  * Orbax's tensorstore kvstore for gs:// (`gcs_utils.get_kvstore_for_gcs`): tensorstore's `file` driver at the
    mapped directory instead of its `gcs` driver, which would need the network. So the array bytes go through the
    same Orbax code path for gs:// (CommitFileTemporaryPath, commit_success files, no renames) but tensorstore's
    gcs driver itself is not exercised;
  * Orbax's hierarchical-namespace probe (`is_hierarchical_namespace_enabled`, which calls google-cloud-storage):
    False, a flat bucket.

Run as a script, `python tests/fake_gcs.py <rrt.train flags>` installs it at $RRT_FAKE_GCS and runs rrt.train, so a
training subprocess writes its `gs://` workdir into the fake bucket.
"""

import contextlib
import os
import sys

from etils.epath import backend, gpath

ENV = "RRT_FAKE_GCS"
UPLOAD_PREFIX = ".upload-"


class Backend(backend._OsPathBackend):  # noqa: SLF001 -- epath's local backend, under gs:// names
    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def local(self, path) -> str:
        path = os.fspath(path)
        if not path.startswith("gs://"):
            raise ValueError(f"fake gcs: not a gs:// path: {path}")
        return os.path.join(self.root, path.removeprefix("gs://"))

    def url(self, local) -> str:
        rel = os.path.relpath(os.fspath(local), self.root)
        return "gs://" + rel

    def open(self, path, mode):
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"fake gcs: objects cannot be appended to or updated in place ({path}, {mode})")
        local = self.local(path)
        if "w" not in mode:
            return super().open(local, mode)
        # A GCS upload is atomic: a reader sees the old object or the new one, never a truncated one. So a write goes
        # to a hidden temporary file that replaces the object when it is closed (and is dropped if the write fails).
        os.makedirs(os.path.dirname(local), exist_ok=True)
        return _Upload(local, mode)

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):  # an upload in flight is not an object yet
        return [n for n in super().listdir(self.local(path)) if not n.startswith(UPLOAD_PREFIX)]

    def glob(self, path):
        return [
            self.url(p) for p in super().glob(self.local(path)) if not os.path.basename(p).startswith(UPLOAD_PREFIX)
        ]

    def walk(self, top, *, top_down=True, on_error=None):
        for d, dirs, files in super().walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.url(d), dirs, [f for f in files if not f.startswith(UPLOAD_PREFIX)]

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(self.local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(self.local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        return super().rmtree(self.local(path))

    def remove(self, path):
        return super().remove(self.local(path))

    def rename(self, path, dst):
        return super().rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        return super().replace(self.local(path), self.local(dst))

    def copy(self, path, dst, *, overwrite):
        return super().copy(self.local(path), self.local(dst), overwrite=overwrite)

    def stat(self, path):
        return super().stat(self.local(path))


class _Upload:
    """A file open for writing that becomes the object `local` only on a clean close."""

    def __init__(self, local: str, mode: str):
        self.local = local
        self.tmp = os.path.join(
            os.path.dirname(local), f"{UPLOAD_PREFIX}{os.getpid()}-{id(self)}-{os.path.basename(local)}"
        )
        self.file = open(self.tmp, mode)  # noqa: SIM115 -- closed by close() / __exit__

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.close()
        else:
            self.file.close()
            os.remove(self.tmp)

    def close(self):
        if not self.file.closed:
            self.file.close()
            os.replace(self.tmp, self.local)


def install(root: str) -> Backend:
    """Routes gs:// to `root` in this process (for good: `patched` undoes it)."""
    from orbax.checkpoint._src.path import gcs_utils

    fake = Backend(root)
    os.makedirs(fake.root, exist_ok=True)
    gpath._PREFIX_TO_BACKEND["gs"] = fake  # noqa: SLF001
    gpath._is_tf_installed = lambda: False  # noqa: SLF001 -- epath would pick TensorFlow's gfile over the table
    gcs_utils.get_kvstore_for_gcs = lambda path: {"driver": "file", "path": fake.local(path)}
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False
    return fake


@contextlib.contextmanager
def patched(root: str):
    """`install(root)` for the duration of a `with` block (in-process tests)."""
    from orbax.checkpoint._src.path import gcs_utils

    saved = (gpath._PREFIX_TO_BACKEND["gs"], gpath._is_tf_installed)  # noqa: SLF001
    saved_gcs = (gcs_utils.get_kvstore_for_gcs, gcs_utils.is_hierarchical_namespace_enabled)
    try:
        yield install(root)
    finally:
        gpath._PREFIX_TO_BACKEND["gs"], gpath._is_tf_installed = saved  # noqa: SLF001
        gcs_utils.get_kvstore_for_gcs, gcs_utils.is_hierarchical_namespace_enabled = saved_gcs


if __name__ == "__main__":
    install(os.environ[ENV])
    from rrt import train

    sys.argv[0] = "rrt.train"
    train.run()
