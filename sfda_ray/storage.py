"""Paths that may be local or a pyarrow filesystem URI (``file://``, ``s3://``, ``gs://``).

A killed job never leaves a file that looks complete: a local write goes to a temporary
name first and is renamed into place; an object in a bucket appears only once its upload
completes.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

if TYPE_CHECKING:
    import pyarrow as pa


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute, a URI as it is: what is handed to a Ray Tune trial or
    a Ray Train worker, each of which runs in a working directory of its own."""
    path = str(path)
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Filesystem and in-filesystem path for a local path or URI."""
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    location, _, query = path.partition("?")
    scheme, rest = location.split("://", 1)
    if scheme in _BUCKET_SCHEMES:  # "bucket/key", as from_uri gives it
        if re.match(r"[^/@]*:[^@]*@", rest):
            raise ValueError(
                f"{scheme}://...@{rest.split('@', 1)[1]}: credentials in a URI would be "
                "written into manifests, tables and logs; give them the filesystem's usual "
                "way (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or an "
                "instance role)"
            )
        bucket = rest.split("/", 1)[0]
        root = f"{scheme}://{bucket}" + (f"?{query}" if query else "")
        return _bucket_filesystem(root), rest.rstrip("/")
    return pafs.FileSystem.from_uri(path)


_BUCKET_SCHEMES = ("s3", "gs")


def _in_bucket(path: str | os.PathLike) -> bool:
    return is_uri(path) and str(path).split("://", 1)[0] in _BUCKET_SCHEMES


@functools.lru_cache(maxsize=32)
def _bucket_filesystem(root: str) -> pafs.FileSystem:
    """One filesystem per bucket (and URI options) per process: making an S3 one asks
    for the bucket's region, a request that a scan of thousands of files would repeat."""
    return pafs.FileSystem.from_uri(root)[0]


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/parts...``; a local base is made absolute, so that a path written into a
    manifest or a scores table still names the file from another working directory or
    another node's worker."""
    base = str(base)
    if is_uri(base):  # parts go before the options (s3://b/x?endpoint_override=...)
        location, sep, query = base.partition("?")
        return "/".join([location.rstrip("/"), *[p.strip("/") for p in parts]]) + sep + query
    return str(Path(absolute(base), *parts))


def beside(path: str | os.PathLike, relative: str) -> str:
    """``relative`` (``..`` allowed) taken from the folder holding ``path``, a local path
    or a URI; a URI keeps its options, and its ``..`` are resolved (an object store has no
    folders to resolve them) but may not leave the bucket. A ``relative`` that is a URI or
    an absolute path is returned as it is."""
    if is_uri(relative) or Path(relative).expanduser().is_absolute():
        return relative
    path = str(path)
    if not is_uri(path):
        return join(Path(path).expanduser().parent, relative)
    location, sep, query = path.partition("?")
    scheme, rest = location.split("://", 1)
    bucket = rest.split("/", 1)[0]
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rest), relative))
    if resolved.split("/", 1)[0] != bucket:
        raise ValueError(f"{relative!r} from {location} leaves {scheme}://{bucket}")
    return f"{scheme}://{resolved}{sep}{query}"


def has_suffix(path: str | os.PathLike, *suffixes: str) -> bool:
    """Whether the file name of a local path or URI (options left out) ends so."""
    return str(path).partition("?")[0].endswith(suffixes)


def basename(path: str | os.PathLike) -> str:
    """The file name of a local path or URI (without the URI's options)."""
    return str(path).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def exists(path: str | os.PathLike) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def file_size(path: str | os.PathLike) -> int:
    fs, p = resolve(path)
    return fs.get_file_info(p).size or 0


def tree_size(directory: str | os.PathLike) -> int:
    """Bytes in the files under ``directory`` (0 when it does not exist)."""
    fs, p = resolve(directory)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


def makedirs(path: str | os.PathLike) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def prepare_output(path: str | os.PathLike, needs_bytes: int = 0, what: str = "") -> None:
    """Create an output directory and prove it takes a file, before any work is done.

    Raises ``OSError`` naming the directory when it cannot be created or written, or when
    a local disk has less free space than ``needs_bytes`` (an estimate of what ``what``
    will write; object stores are not checked).
    """
    probe = join(path, f".write-probe-{os.getpid()}")
    try:
        makedirs(path)
        atomic_write_bytes(probe, b"")
        fs, p = resolve(probe)
        fs.delete_file(p)
    except OSError as e:
        raise OSError(f"output location {path} is not writable: {e}") from e
    check_free_space(path, needs_bytes, what)


def check_free_space(path: str | os.PathLike, needs_bytes: int, what: str) -> None:
    """``OSError`` (ENOSPC) naming ``path`` when its local disk cannot take ``needs_bytes``."""
    if needs_bytes <= 0 or (is_uri(path) and not str(path).startswith("file://")):
        return
    free = shutil.disk_usage(resolve(path)[1]).free
    if free < needs_bytes:
        raise OSError(
            errno.ENOSPC,
            f"output location {path} has {free / 2**20:.1f} MiB free; {what} needs about "
            f"{needs_bytes / 2**20:.1f} MiB: free some space or choose another output",
        )


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, p = resolve(path)
    # A random-access file knows its size and reads it whole in one request; an S3 input
    # stream reads on in small ranged requests (60x slower for a model file).
    with fs.open_input_file(p) as f:
        return f.read()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling and a rename; in a bucket
    directly, since an object appears only once its upload completes (and a bucket has
    no folders to create), which saves a copy, a delete and the folder markers."""
    fs, p = resolve(path)
    if _in_bucket(path):
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, p)
    except BaseException as e:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        if isinstance(e, OSError) and _disk_full(e):
            # pyarrow's message does not name the file; the previous version stays intact.
            raise OSError(
                errno.ENOSPC, f"no space left on device writing {path} ({len(data)} bytes)"
            ) from e
        raise


def remove(path: str | os.PathLike) -> bool:
    """Delete the file at ``path``; False when there was none."""
    fs, p = resolve(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        return False
    return True


def remove_tree(directory: str | os.PathLike) -> int:
    """Delete ``directory`` and everything under it; the bytes its files held (0 when
    there was none)."""
    fs, p = resolve(directory)
    size = tree_size(directory)
    try:
        fs.delete_dir(p)
    except FileNotFoundError:
        return 0
    return size


def _disk_full(error: OSError) -> bool:
    return error.errno == errno.ENOSPC or "No space left on device" in str(error)


def list_names(directory: str | os.PathLike) -> list[str]:
    """Paths of the files directly or indirectly under ``directory``, relative to it, sorted
    (none when it does not exist)."""
    fs, root = resolve(directory)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    prefix = root.rstrip("/") + "/"
    return sorted(i.path[len(prefix) :] for i in infos if i.type == pafs.FileType.File)


def list_files(directory: str | os.PathLike, suffix: str = "") -> list[str]:
    """Files directly or indirectly under ``directory`` ending in ``suffix``, sorted."""
    _, root = resolve(directory)
    found = [f"{root.rstrip('/')}/{n}" for n in list_names(directory) if n.endswith(suffix)]
    scheme = str(directory).split("://", 1)[0] if is_uri(directory) else "file"
    # Object stores list "bucket/key": give back URIs that resolve() understands, with the
    # directory's options (endpoint, region) kept.
    _, sep, query = str(directory).partition("?")
    return found if scheme == "file" else [f"{scheme}://{f}{sep}{query}" for f in found]


def read_parquet(path: str | os.PathLike, schema: pa.Schema | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    fs, p = resolve(path)
    return pq.read_table(p, filesystem=fs, schema=schema)


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Atomic Parquet write (temporary name, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue().to_pybytes())
