"""Private cache directories: where a worker keeps native code it will load (compiled packages,
inductor's and Triton's caches). Code found in a directory another user can write to could be
theirs, so only a real directory owned by this user and writable by nobody else is used."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from inference.errors import UnsafeCacheDir


def default_cache_dir() -> str:
    """Where packages go when ``model.compile_cache_dir`` is unset: per user, under the temp dir."""
    return os.path.join(tempfile.gettempdir(), f"visionstream-compiled-{os.getuid()}")


def private_dir(path: str) -> Path:
    """``path``, created 0700 if missing, resolved; raises UnsafeCacheDir unless it is a real
    directory (not a symlink) owned by this user and writable by nobody else."""
    folder = Path(path)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(folder)
    return folder.resolve()


def check_private(path: Path) -> None:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeCacheDir(f"{path} is a symbolic link")
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheDir(
            f"{path} is owned by uid {info.st_uid} with mode {stat.filemode(info.st_mode)}: it must be this user's "
            f"(uid {os.getuid()}) and writable by no one else"
        )


def use_private_inductor_caches(cache_dir: str | None) -> None:
    """Point torch.compile's caches (inductor's and Triton's) into a private folder under
    ``model.compile_cache_dir`` before it compiles on a GPU: their default is a folder named after
    the user in the system's temp directory, which anyone can create first. An operator's own
    ``TORCHINDUCTOR_CACHE_DIR``/``TRITON_CACHE_DIR`` are kept, checked alike. torch reads these
    two from the environment only (it sets the first there itself), so they are set there, once,
    before the first compile."""
    root = private_dir(cache_dir or default_cache_dir())
    for name, folder in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        given = os.environ.get(name)
        os.environ[name] = str(private_dir(given) if given else private_dir(str(root / folder)))
