"""Offline datasets: Fashion-MNIST (the victim's task) and Animal-MNIST (a thief's pool).

Both come from ordinary package managers, never from ad-hoc URLs:

- Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (four IDX ``.gz`` files under
  ``/usr/share/datasets/fashion-mnist``). ``fetch_all`` uses the installed package, else
  ``apt-get download`` + ``dpkg-deb -x`` into the cache (no root needed), else, as root,
  ``apt-get install``. Any folder holding the four IDX files works too (``data_dir``
  argument, ``--data-dir`` option or ``GRAD2_DATA_DIR``).
- Animal-MNIST: the PyPI wheel ``animal-mnist==0.4`` (fetched with ``pip download
  --no-deps``; its declared dependencies, tensorflow among them, are never installed). Its
  two gzip-pickled numpy arrays are read with a restricted unpickler and converted once to
  ``animal-mnist.npz`` in the cache.

Images are ``uint8 [N, 28, 28]``, object bright on a dark background (both datasets);
:func:`to_tensor` turns them into the networks' normalised ``float32 [N, 1, 28, 28]`` input.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import importlib.util
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

#: Pixel mean and standard deviation of the 60,000 Fashion-MNIST training images, on the
#: [0, 1] scale (computed once from the data; hard-coded so every component agrees).
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530

FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Animal-MNIST labels 0..9, in this order (checked against the images).
ANIMAL_CLASSES: tuple[str, ...] = (
    "Bear",
    "Bird",
    "Cat",
    "Cow",
    "Dog",
    "Elephant",
    "Giraffe",
    "Horse",
    "Sheep",
    "Zebra",
)

FASHION_DEB = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_SPLITS: dict[str, tuple[str, int]] = {"train": ("train", 60_000), "test": ("t10k", 10_000)}
#: The victim trains on the first 50,000 training images; the last 10,000 are the
#: "distribution-aware" thief's pool and are never shown to the victim.
VICTIM_TRAIN_SIZE = 50_000
HELDOUT_SIZE = 10_000

ANIMAL_WHEEL = "animal-mnist==0.4"
ANIMAL_MEMBERS = {
    "images": "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
    "labels": "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz",
}
ANIMAL_SIZE = 10_000
ANIMAL_NPZ = "animal-mnist.npz"

THIEF_POOLS = ("animal", "fashion_heldout")
IMAGE_SIDE = 28


class DataError(RuntimeError):
    """A dataset is missing, cannot be fetched, or its files are corrupt."""


@dataclass(frozen=True)
class Dataset:
    """An image classification set kept in memory.

    ``images``: ``uint8 [N, 28, 28]``; ``labels``: ``int64 [N]`` or ``None`` (unlabelled
    pool); ``class_names``: the ``K`` names indexed by label; ``name``: where it came from.
    """

    images: np.ndarray
    labels: np.ndarray | None
    class_names: list[str]
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 3:
            raise ValueError(f"images must be uint8 [N, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels is not None and (
            self.labels.dtype != np.int64 or self.labels.shape != (len(self.images),)
        ):
            raise ValueError(f"labels must be int64 [{len(self.images)}], got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: np.ndarray | slice, name: str | None = None) -> Dataset:
        """The examples at ``indices`` (an index array or a slice), as a new ``Dataset``."""
        return Dataset(
            images=self.images[indices],
            labels=None if self.labels is None else self.labels[indices],
            class_names=list(self.class_names),
            name=self.name if name is None else name,
        )


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 [N, 28, 28]`` (or ``[N, 1, 28, 28]``) -> normalised ``float32 [N, 1, 28, 28]``."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {tensor.dtype}")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.ndim != 4 or tensor.shape[1] != 1:
        raise ValueError(
            f"expected images [N, 28, 28] or [N, 1, 28, 28], got {tuple(tensor.shape)}"
        )
    return (tensor.float() / 255.0 - FASHION_MEAN) / FASHION_STD


# --------------------------------------------------------------------------- cache folder


def cache_dir() -> Path:
    """Folder for fetched data: ``$GRAD2_CACHE``, else ``<repo>/.cache`` in a source
    checkout, else ``~/.cache/grad2``. Created on demand."""
    configured = os.environ.get("GRAD2_CACHE")
    if configured:
        folder = Path(configured).expanduser()
    else:
        repo_root = Path(__file__).resolve().parents[2]
        in_checkout = (repo_root / "pyproject.toml").is_file() and (repo_root / "grad2").is_dir()
        folder = repo_root / ".cache" if in_checkout else Path.home() / ".cache" / "grad2"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------- IDX files

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of one (uncompressed) IDX file into an array of its declared shape.

    Raises :class:`DataError` naming ``source`` on a bad magic number, an unknown type code,
    or a body whose length does not match the header's dimensions.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{source}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"{source}: unknown IDX element type 0x{type_code:02x}")
    if ndim == 0:
        raise DataError(f"{source}: IDX header declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{source}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    body = len(raw) - header_size
    if body != expected:
        kind = "truncated" if body < expected else "has trailing bytes"
        raise DataError(
            f"{source}: IDX file {kind}: header says {dims} of {dtype} ({expected} bytes), "
            f"body has {body} bytes"
        )
    array = np.frombuffer(raw, dtype, offset=header_size).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


@functools.lru_cache(maxsize=4)
def _idx_payload(path: str, size: int, mtime_ns: int) -> bytes:
    """The decompressed bytes of an IDX file, kept per (path, size, mtime): bytes are
    immutable, so repeated loads in one process skip the gunzip but still get fresh arrays."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(f"{path}: corrupt gzip stream: {error}") from error
    return raw


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (detected from its first bytes)."""
    path = Path(path)
    stat = path.stat()
    return parse_idx(_idx_payload(str(path), stat.st_size, stat.st_mtime_ns), str(path))


def _fashion_files(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) IDX files of ``split`` in ``folder``, ``.gz`` or not."""
    prefix, _ = FASHION_SPLITS[split]
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [folder / f"{prefix}-{kind}{suffix}" for suffix in (".gz", "")]
        existing = [c for c in candidates if c.is_file()]
        if not existing:
            return None
        found.append(existing[0])
    return found[0], found[1]


def _has_fashion(folder: Path) -> bool:
    return all(_fashion_files(folder, split) is not None for split in FASHION_SPLITS)


def _fashion_search_path(data_dir: Path | None) -> tuple[list[Path], bool]:
    """Folders to look in, and whether the user named one explicitly."""
    explicit = data_dir if data_dir is not None else os.environ.get("GRAD2_DATA_DIR") or None
    if explicit is not None:
        return [Path(explicit).expanduser()], True
    return [FASHION_SYSTEM_DIR, cache_dir() / "fashion-mnist"], False


def _missing_fashion_message(folders: list[Path]) -> str:
    looked = ", ".join(str(f) for f in folders)
    return (
        f"Fashion-MNIST not found (looked in {looked}). Either run `grad2 fetch-data` "
        f"(uses the Debian package {FASHION_DEB}: installed under {FASHION_SYSTEM_DIR}, or "
        f"fetched with apt-get download into the cache), or point --data-dir / GRAD2_DATA_DIR "
        "at a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (.gz optional)."
    )


def find_fashion_dir(data_dir: Path | None = None) -> Path:
    """The folder that holds the Fashion-MNIST IDX files; :class:`DataError` if none does."""
    folders, _ = _fashion_search_path(data_dir)
    for folder in folders:
        if _has_fashion(folder):
            return folder
    raise DataError(_missing_fashion_message(folders))


def load_fashion_mnist(split: str, data_dir: Path | None = None) -> Dataset:
    """Fashion-MNIST ``split`` ("train": 60,000 images, "test": 10,000), checked for size,
    shape and label range."""
    if split not in FASHION_SPLITS:
        raise ValueError(f"split must be one of {', '.join(FASHION_SPLITS)}, got {split!r}")
    folder = find_fashion_dir(data_dir)
    images_path, labels_path = _fashion_files(folder, split)  # type: ignore[misc]
    images, labels = read_idx(images_path), read_idx(labels_path)
    _, count = FASHION_SPLITS[split]
    if images.dtype != np.uint8 or images.shape != (count, IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{images_path}: expected uint8 images of shape ({count}, 28, 28), "
                        f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != (count,):
        raise DataError(f"{labels_path}: expected {count} uint8 labels, got "
                        f"{labels.dtype} {labels.shape}")
    if labels.max() >= len(FASHION_CLASSES):
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range 0..9")
    return Dataset(images, labels.astype(np.int64), list(FASHION_CLASSES), f"fashion_mnist/{split}")


def victim_train_split(data_dir: Path | None = None) -> Dataset:
    """The victim's training data: the first 50,000 Fashion-MNIST training images."""
    train = load_fashion_mnist("train", data_dir)
    return train.subset(slice(0, VICTIM_TRAIN_SIZE), "fashion_mnist/victim_train")


def fashion_heldout(data_dir: Path | None = None) -> Dataset:
    """The last 10,000 Fashion-MNIST training images, never seen by the victim."""
    train = load_fashion_mnist("train", data_dir)
    return train.subset(slice(len(train) - HELDOUT_SIZE, None), "fashion_mnist/heldout")


# --------------------------------------------------------------------------- Animal-MNIST


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild plain numpy arrays and nothing else.

    ``find_class`` resolves only the three globals a pickled ``ndarray`` needs; any other
    global (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError``.
    """

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays may be unpickled"
            ) from None


def restricted_load_array(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Unpickle a single numeric numpy array from ``raw`` with :class:`RestrictedUnpickler`."""
    try:
        value = RestrictedUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as error:
        raise DataError(f"{source}: {error}") from error
    except Exception as error:  # malformed streams raise many types
        raise DataError(f"{source}: not a valid pickled numpy array: {error}") from error
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise DataError(f"{source}: expected a numeric numpy array, got {kind}")
    return value


def _animal_arrays_from_wheel(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        missing = [m for m in ANIMAL_MEMBERS.values() if m not in names]
        if missing:
            raise DataError(f"{wheel}: does not contain {', '.join(missing)}")
        raw = {key: archive.read(member) for key, member in ANIMAL_MEMBERS.items()}
    return _decode_animal(raw, str(wheel))


def _animal_arrays_from_installed() -> tuple[np.ndarray, np.ndarray] | None:
    """The arrays of an ``animal_mnist`` package importable here (without importing it)."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))).parent
    paths = {key: root / member for key, member in ANIMAL_MEMBERS.items()}
    if not all(p.is_file() for p in paths.values()):
        return None
    return _decode_animal({k: p.read_bytes() for k, p in paths.items()}, str(root))


def _decode_animal(raw: dict[str, bytes], source: str) -> tuple[np.ndarray, np.ndarray]:
    decoded = {}
    for key, blob in raw.items():
        name = f"{source}:{ANIMAL_MEMBERS[key]}"
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(f"{name}: corrupt gzip stream: {error}") from error
        decoded[key] = restricted_load_array(blob, name)
    images, labels = decoded["images"], decoded["labels"]
    if images.dtype != np.uint8 or images.shape != (ANIMAL_SIZE, IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{source}: expected uint8 images ({ANIMAL_SIZE}, 28, 28), "
                        f"got {images.dtype} {images.shape}")
    if labels.shape != (ANIMAL_SIZE,) or labels.min() < 0 or labels.max() >= len(ANIMAL_CLASSES):
        raise DataError(f"{source}: expected {ANIMAL_SIZE} labels in 0..9")
    # The package's silhouettes are already bright on a dark background, like
    # Fashion-MNIST; refuse an inverted copy rather than silently mixing polarities.
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1)
    if border.mean() > images[:, 10:18, 10:18].mean():
        raise DataError(f"{source}: images look inverted (bright background)")
    return images, labels.astype(np.int64)


def _download_animal_wheel(into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", ANIMAL_WHEEL, "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("animal_mnist-*.whl"))
    if result.returncode != 0 or not wheels:
        raise DataError(
            f"could not fetch Animal-MNIST with `{' '.join(command[2:])}` "
            f"(exit {result.returncode}): {result.stderr.strip()[-500:]}. Install the wheel "
            f"yourself (`pip install --no-deps {ANIMAL_WHEEL}`) or put it into {cache_dir()}."
        )
    return wheels[0]


def _save_npz_atomically(path: Path, **arrays: np.ndarray) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def fetch_animal_mnist() -> Path:
    """Make sure ``<cache>/animal-mnist.npz`` exists; returns its path."""
    target = cache_dir() / ANIMAL_NPZ
    if target.is_file():
        return target
    arrays = _animal_arrays_from_installed()
    if arrays is None:
        local_wheels = sorted(cache_dir().glob("animal_mnist-0.4-*.whl"))
        if local_wheels:
            arrays = _animal_arrays_from_wheel(local_wheels[0])
        else:
            with tempfile.TemporaryDirectory(dir=cache_dir()) as temporary:
                arrays = _animal_arrays_from_wheel(_download_animal_wheel(Path(temporary)))
    images, labels = arrays
    _save_npz_atomically(target, images=images, labels=labels)
    return target


def load_animal_mnist() -> Dataset:
    """Animal-MNIST: 10,000 silhouettes ``uint8 [10000, 28, 28]`` with labels 0..9."""
    path = cache_dir() / ANIMAL_NPZ
    if not path.is_file():
        raise DataError(
            f"Animal-MNIST not found at {path}. Run `grad2 fetch-data` (pip download "
            f"--no-deps {ANIMAL_WHEEL}), or `pip install --no-deps {ANIMAL_WHEEL}` here."
        )
    with np.load(path, allow_pickle=False) as archive:
        images, labels = archive["images"], archive["labels"]
    if images.dtype != np.uint8 or images.shape != (ANIMAL_SIZE, IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{path}: corrupt cache file (images {images.dtype} {images.shape}); "
                        "delete it and run `grad2 fetch-data`")
    return Dataset(images, labels.astype(np.int64), list(ANIMAL_CLASSES), "animal_mnist")


# --------------------------------------------------------------------------- thief pools


def thief_pool(name: str, size: int | None = None, seed: int = 0,
               data_dir: Path | None = None) -> Dataset:
    """A thief's query pool: "animal" (Animal-MNIST, 10,000) or "fashion_heldout" (the last
    10,000 Fashion-MNIST training images). ``size`` draws a seeded random subset (order
    fixed by ``seed``); ``None`` keeps the whole pool in its stored order."""
    if name == "animal":
        pool = load_animal_mnist()
    elif name == "fashion_heldout":
        pool = fashion_heldout(data_dir)
    else:
        raise ValueError(f"thief pool must be one of {', '.join(THIEF_POOLS)}, got {name!r}")
    if size is None:
        return pool
    return pool.subset(pool_indices(len(pool), size, seed))


def pool_indices(length: int, size: int, seed: int) -> np.ndarray:
    """``[size]``: the indices of the seeded subset :func:`thief_pool` draws from a pool of
    ``length`` images."""
    if not 0 < size <= length:
        raise ValueError(f"pool size must be in 1..{length}, got {size}")
    return np.random.default_rng(seed).permutation(length)[:size]


# --------------------------------------------------------------------------- fetching


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:  # no apt-get / dpkg-deb on this system
        return subprocess.CompletedProcess(command, 127, "", str(error))


def _apt_lists_missing(stderr: str) -> bool:
    lists = Path("/var/lib/apt/lists")
    no_lists = not lists.is_dir() or not any(lists.glob("*Packages*"))
    return no_lists or "Unable to locate package" in stderr or "no installation candidate" in stderr


def _fetch_fashion_deb(destination: Path) -> list[str]:
    """Download the Debian package and unpack its IDX files into ``destination``.

    Returns a log of what was tried. Leaves ``destination`` untouched on failure.
    """
    log: list[str] = []
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as temporary:
        work = Path(temporary)
        download = _run(["apt-get", "download", FASHION_DEB], cwd=work)
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        if download.returncode != 0 and is_root and _apt_lists_missing(download.stderr):
            log.append("apt-get download failed for lack of package lists; running apt-get update")
            _run(["apt-get", "update"])
            download = _run(["apt-get", "download", FASHION_DEB], cwd=work)
        debs = sorted(work.glob(f"{FASHION_DEB}_*.deb"))
        if download.returncode == 0 and debs:
            unpacked = work / "unpacked"
            extract = _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
            source = unpacked / FASHION_SYSTEM_DIR.relative_to("/")
            if extract.returncode == 0 and _has_fashion(source):
                staged = work / "fashion-mnist"
                shutil.move(str(source), staged)
                if destination.exists():
                    shutil.rmtree(destination)
                os.replace(staged, destination)
                log.append(f"unpacked {debs[0].name} into {destination}")
                return log
            log.append(f"dpkg-deb -x failed: {extract.stderr.strip()[-300:]}")
        else:
            log.append(f"apt-get download failed: {download.stderr.strip()[-300:]}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        install = _run(["apt-get", "install", "-y", FASHION_DEB])
        log.append("apt-get install " + ("succeeded" if install.returncode == 0
                                         else f"failed: {install.stderr.strip()[-300:]}"))
    return log


def fetch_fashion_mnist(data_dir: Path | None = None) -> Path:
    """Make Fashion-MNIST available; returns the folder holding its IDX files."""
    folders, explicit = _fashion_search_path(data_dir)
    for folder in folders:
        if _has_fashion(folder):
            return folder
    if explicit:  # the user named a folder: never fetch behind their back
        raise DataError(_missing_fashion_message(folders))
    log = _fetch_fashion_deb(cache_dir() / "fashion-mnist")
    for folder in folders:
        if _has_fashion(folder):
            return folder
    raise DataError(_missing_fashion_message(folders) + " Fetch log: " + "; ".join(log))


def _fetch_and_check(data_dir: Path | None) -> dict[str, tuple[Dataset, Path]]:
    fashion = fetch_fashion_mnist(data_dir)
    animal = fetch_animal_mnist()
    found = {f"fashion_mnist/{split}": (load_fashion_mnist(split, data_dir), fashion)
             for split in FASHION_SPLITS}
    found["animal_mnist"] = (load_animal_mnist(), animal)
    return found


def fetch_all(data_dir: Path | None = None) -> None:
    """Fetch both datasets into the cache if needed (idempotent; fast when cached), then
    load each once to check it."""
    _fetch_and_check(data_dir)


# --------------------------------------------------------------------------- CLI


def _fetch_data_command(args: argparse.Namespace) -> int:
    for name, (dataset, source) in _fetch_and_check(args.data_dir).items():
        print(f"{name}: {len(dataset)} images {'x'.join(map(str, dataset.images.shape[1:]))}, "
              f"{dataset.num_classes} classes, from {source}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fetch-data`` to the ``grad2`` command."""
    parser = subparsers.add_parser(
        "fetch-data",
        help="fetch Fashion-MNIST (Debian package) and Animal-MNIST (PyPI wheel) into the cache",
    )
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with the Fashion-MNIST IDX files (default: $GRAD2_DATA_DIR, "
                             f"{FASHION_SYSTEM_DIR}, or the cache)")
    parser.set_defaults(func=_fetch_data_command)
