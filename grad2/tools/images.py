"""Image folders (and ``.npz`` files) read exactly as the TorchServe worker reads requests.

Every tool that works on a user's own images goes through :func:`open_images`:

- a **labelled** folder holds one sub-folder per class, named as in the archive's
  ``index_to_name.json`` (a sub-folder that is not a class is refused, naming it; a class
  with no images is allowed and reported);
- an **unlabelled** folder is searched recursively for image files;
- an ``.npz`` holds ``images`` (``uint8 [N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]``)
  and, when labelled, ``labels`` (``int [N]``).

Each file is decoded by :func:`grad2.serve.codec.decode_image` (the worker's decoder: mode
conversion to the model's channels, 16-bit scaling, resizing to the model's size) and
normalised by :func:`grad2.serve.codec.normalise`, so a tool sees the pixels the server
sees. A file that cannot be decoded is skipped and counted, never a crash. Folders are
streamed in batches (:meth:`ImageSet.batches`), so a folder of any size is never held in
memory at once; :meth:`ImageSet.load` holds the ``uint8`` pixels for training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from grad2.config import InputConfig
from grad2.serve import RequestError, decode_image, normalise
from grad2.tools.progress import progress_bar

#: File suffixes read as images (what Pillow decodes among the worker's formats).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff",
                                   ".webp", ".ppm", ".pgm", ".tga")


class ImageFolderError(ValueError):
    """A folder or file that cannot be used as asked; the message names it."""


@dataclass
class ImageSet:
    """Images of one folder or ``.npz``, decoded on demand at ``spec``'s size.

    ``labels`` is ``int64 [N]`` for a labelled set, else ``None``; ``class_names`` the
    names indexed by label (labelled sets only). ``skipped`` lists the files that could
    not be decoded so far, with the reason.
    """

    source: Path
    spec: InputConfig
    files: list[Path] | None = None
    pixels: np.ndarray | None = None  # uint8 [N, C, H, W] from an .npz
    labels: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.pixels)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """The images at ``indices`` (positions in this set), as a new set."""
        positions = np.asarray(indices, dtype=np.int64)
        return ImageSet(
            self.source, self.spec,
            files=None if self.files is None else [self.files[i] for i in positions],
            pixels=None if self.pixels is None else self.pixels[positions],
            labels=None if self.labels is None else self.labels[positions],
            class_names=list(self.class_names))

    def class_counts(self) -> dict[str, int]:
        """Images per class name (labelled sets), zeros included."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return dict(zip(self.class_names, (int(c) for c in counts), strict=True))

    def describe(self) -> str:
        """One line for people: where, how many, which classes are empty."""
        text = f"{self.source}: {len(self)} images"
        if self.labelled:
            empty = [name for name, count in self.class_counts().items() if count == 0]
            text += f", {len(self.class_names)} classes"
            if empty:
                text += f" ({len(empty)} with no images: {', '.join(empty[:10])})"
        return text

    def batches(self, batch_size: int = 256, progress: bool = True, desc: str | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """``(x, labels, indices)`` per batch: ``x`` the normalised model input
        ``[B, C, H, W]``, ``labels`` ``[B]`` (or ``None``), ``indices`` ``[B]`` the images'
        positions in the set. Files that fail to decode are left out of their batch and
        recorded in :attr:`skipped`."""
        for pixels, labels, indices in self.pixel_batches(batch_size, progress, desc):
            yield normalise(pixels.float() / 255.0, self.spec), labels, indices

    def pixel_batches(self, batch_size: int = 256, progress: bool = True,
                      desc: str | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """As :meth:`batches`, with ``uint8 [B, C, H, W]`` pixels instead of model input."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        total = len(self)
        bar = progress_bar(total=total, desc=desc or self.source.name, unit="img",
                           disable=not progress, leave=False)
        try:
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                if self.pixels is not None:
                    kept = np.arange(start, stop)
                    pixels = torch.from_numpy(self.pixels[start:stop])
                else:
                    decoded, kept_list = [], []
                    for index in range(start, stop):
                        image = self._decode(self.files[index])
                        if image is not None:
                            decoded.append(image)
                            kept_list.append(index)
                    kept = np.asarray(kept_list, dtype=np.int64)
                    if not decoded:
                        bar.update(stop - start)
                        continue
                    pixels = torch.stack(decoded)
                labels = None if self.labels is None else torch.from_numpy(self.labels[kept])
                bar.update(stop - start)
                yield pixels, labels, torch.from_numpy(kept)
        finally:
            bar.close()

    def load(self, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every decodable image, ``uint8 [N, C, H, W]``, and its labels (``int64 [N]`` or
        ``None``): for training, which needs the set many times (``N·C·H·W`` bytes)."""
        pixels, labels = [], []
        for batch, batch_labels, _ in self.pixel_batches(1024, progress, "loading"):
            pixels.append(batch)
            if batch_labels is not None:
                labels.append(batch_labels)
        if not pixels:
            raise ImageFolderError(f"{self.source}: none of its {len(self)} images could be "
                                   f"decoded{self._skipped_hint()}")
        return torch.cat(pixels), torch.cat(labels) if labels else None

    def _decode(self, path: Path) -> torch.Tensor | None:
        try:
            data = path.read_bytes()
            image = decode_image(data, self.spec)
        except RequestError as error:
            self.skipped.append((str(path), error.message))
            return None
        except OSError as error:
            self.skipped.append((str(path), type(error).__name__))
            return None
        # decode_image's floats are uint8 / 255 exactly: multiplying back is lossless.
        return (image * 255.0).round_().to(torch.uint8)

    def _skipped_hint(self) -> str:
        if not self.skipped:
            return ""
        path, reason = self.skipped[0]
        return f" (first: {path}: {reason})"


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, in a stable (sorted) order."""
    return sorted(path for path in folder.rglob("*")
                  if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


def folder_classes(folder: Path) -> list[str]:
    """The class names of a labelled folder: its sub-folders, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderError(f"{folder} is not a folder")
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir()
                   and not entry.name.startswith("."))
    if not names:
        raise ImageFolderError(f"{folder} has no class sub-folders (a labelled folder holds "
                               "one sub-folder of images per class)")
    return names


def open_images(
    path: Path, spec: InputConfig, class_names: Sequence[str] | None = None,
    labelled: bool = False,
) -> ImageSet:
    """An :class:`ImageSet` of a folder or ``.npz`` at ``spec``'s channels and size.

    Args:
        path: a folder, or an ``.npz`` with ``images`` (and ``labels``).
        spec: the model's ``input:`` section (channels, size, mean/std, max side).
        class_names: the archive's classes, index order. A labelled folder's sub-folders
            must be among them; ``None`` takes the sub-folders themselves, sorted.
        labelled: read labels (class sub-folders, or the ``.npz``'s ``labels``).

    Raises:
        ImageFolderError: naming the folder or file, when it is missing, holds no images,
            or its classes do not match.
    """
    path = Path(path)
    if not path.exists():
        raise ImageFolderError(f"{path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise ImageFolderError(f"{path}: expected a folder of images or an .npz file")
        return _open_npz(path, spec, class_names, labelled)
    if not labelled:
        files = image_files(path)
        if not files:
            raise ImageFolderError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return ImageSet(path, spec, files=files)
    present = folder_classes(path)
    names = list(present if class_names is None else class_names)
    unknown = [name for name in present if name not in names]
    if unknown:
        raise ImageFolderError(
            f"{path}: sub-folder(s) {', '.join(unknown[:5])} are not classes of the model "
            f"(its classes: {', '.join(names[:12])}{'...' if len(names) > 12 else ''})")
    files, labels = [], []
    for label, name in enumerate(names):
        found = image_files(path / name) if name in present else []
        files += found
        labels += [label] * len(found)
    if not files:
        raise ImageFolderError(f"{path} holds no image files in its class sub-folders")
    return ImageSet(path, spec, files=files, labels=np.asarray(labels, dtype=np.int64),
                    class_names=names)


def _open_npz(path: Path, spec: InputConfig, class_names: Sequence[str] | None,
              labelled: bool) -> ImageSet:
    with np.load(path, allow_pickle=False) as archive:
        if "images" not in archive:
            raise ImageFolderError(f"{path} has no 'images' array (it has: "
                                   f"{', '.join(archive.files)})")
        images = archive["images"]
        labels = archive["labels"] if labelled and "labels" in archive else None
    if labelled and labels is None:
        raise ImageFolderError(f"{path} has no 'labels' array")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
        raise ImageFolderError(f"{path}: 'images' must be uint8 [N, H, W], [N, H, W, C] or "
                               f"[N, C, H, W] with N > 0, got {images.dtype} "
                               f"{tuple(images.shape)}")
    pixels = _npz_pixels(images, spec, path)
    names: list[str] = []
    if labels is not None:
        labels = labels.astype(np.int64)
        if labels.shape != (len(images),):
            raise ImageFolderError(f"{path}: 'labels' must be [N] = [{len(images)}], got "
                                   f"{tuple(labels.shape)}")
        names = list(class_names) if class_names is not None else [
            str(k) for k in range(int(labels.max()) + 1)]
        if labels.min() < 0 or labels.max() >= len(names):
            raise ImageFolderError(f"{path}: labels must lie in [0, {len(names) - 1}]")
    return ImageSet(path, spec, pixels=pixels, labels=labels, class_names=names)


def _npz_pixels(images: np.ndarray, spec: InputConfig, path: Path) -> np.ndarray:
    """``uint8 [N, C, H, W]`` at the model's channels and size, converted as the worker
    converts a decoded image (PIL mode conversion, bilinear resize)."""
    from PIL import Image

    from grad2.serve import CHANNEL_MODES

    if images.ndim == 4 and images.shape[1] in (1, 3, 4) and images.shape[-1] not in (1, 3, 4):
        images = images.transpose(0, 2, 3, 1)  # [N, C, H, W] -> [N, H, W, C]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    shape_ok = images.shape[1:3] == (spec.height, spec.width)
    modes = {2: "L", 3: "RGB", 4: "RGBA"}
    source_mode = "L" if images.ndim == 3 else modes.get(images.shape[-1])
    if source_mode is None:
        raise ImageFolderError(f"{path}: cannot read {images.shape[-1]}-channel images")
    target_mode = CHANNEL_MODES[spec.channels]
    if shape_ok and source_mode == target_mode:
        out = images if images.ndim == 4 else images[..., None]
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    converted = []
    for image in images:
        picture = Image.fromarray(image, mode=source_mode).convert(target_mode)
        if picture.size != (spec.width, spec.height):
            picture = picture.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        array = np.asarray(picture, dtype=np.uint8)
        converted.append(array[:, :, None] if array.ndim == 2 else array)
    return np.ascontiguousarray(np.stack(converted).transpose(0, 3, 1, 2))


def images_needed(max_drop_points: float, half_width_points: float = 0.5,
                  z: float = 1.96) -> int:
    """Labelled images a validation set needs so that an accuracy *drop* near
    ``max_drop_points`` is known to ``± half_width_points`` (95% normal interval).

    The drop is a paired difference on the same images: each image contributes -1, 0 or +1
    (its correctness lost, kept, or gained), so its variance is at most the fraction of
    images whose correctness changes, which near the chosen budget is about the drop."""
    changed = max(max_drop_points, half_width_points) / 100
    return math.ceil(z * z * changed / (half_width_points / 100) ** 2)
