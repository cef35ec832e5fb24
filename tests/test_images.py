"""Image folders read as the worker reads requests (grad2.tools.images): the same tensor as
the worker's decoder for the same file, refusals that name the folder or file, unreadable
files skipped and counted, and memory that stays flat while a large folder streams."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grad2.config import InputConfig
from grad2.serve import decode_image, normalise
from grad2.tools.images import ImageFolderError, images_needed, open_images

RGB32 = InputConfig.from_dict({"channels": 3, "height": 32, "width": 32,
                               "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]})
GRAY28 = InputConfig.from_dict({"channels": 1, "height": 28, "width": 28,
                                "mean": [0.3], "std": [0.35]})
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".tif": "TIFF",
           ".webp": "WEBP"}


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 36), mode: str = "RGB"
                ) -> Path:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(
        path, format=FORMATS[path.suffix.lower()])
    return path


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    root = tmp_path / "labelled"
    for label, name in enumerate(["cat", "dog", "owl"]):
        (root / name).mkdir(parents=True)
        for index, suffix in enumerate(FORMATS if name != "owl" else []):
            write_image(root / name / f"{index}{suffix}", 10 * label + index)
    return root


def test_every_file_gives_the_workers_tensor(labelled: Path) -> None:
    images = open_images(labelled, RGB32, ["cat", "dog", "owl"], labelled=True)
    assert len(images) == 2 * len(FORMATS)
    seen = 0
    for x, labels, indices in images.batches(batch_size=5, progress=False):
        for row, label, index in zip(x, labels, indices, strict=True):
            path = images.files[int(index)]
            worker = normalise(decode_image(path.read_bytes(), RGB32).unsqueeze(0), RGB32)[0]
            assert torch.equal(row, worker), path
            assert images.class_names[int(label)] == path.parent.name
            seen += 1
    assert seen == len(images) and images.skipped == []


def test_empty_class_is_reported_and_labels_follow_the_archive_order(labelled: Path) -> None:
    images = open_images(labelled, RGB32, ["owl", "dog", "cat", "eel"], labelled=True)
    assert images.class_counts() == {"owl": 0, "dog": 6, "cat": 6, "eel": 0}
    assert "with no images: owl, eel" in images.describe()
    pixels, labels = images.load(progress=False)
    assert pixels.dtype == torch.uint8 and pixels.shape == (12, 3, 32, 32)
    assert sorted(set(labels.tolist())) == [1, 2]


def test_gray_model_converts_colour_images_as_the_worker_does(labelled: Path) -> None:
    images = open_images(labelled / "cat", GRAY28)
    x, labels, _ = next(images.batches(progress=False))
    assert labels is None and x.shape == (6, 1, 28, 28)
    first = images.files[0]
    assert torch.equal(x[0], normalise(decode_image(first.read_bytes(), GRAY28)[None], GRAY28)[0])


def test_refusals_name_the_folder_or_file(labelled: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageFolderError, match=r"dog.*not classes of the model"):
        open_images(labelled, RGB32, ["cat", "owl"], labelled=True)
    with pytest.raises(ImageFolderError, match="does not exist"):
        open_images(tmp_path / "nowhere", RGB32)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(ImageFolderError, match=r"empty holds no image files"):
        open_images(tmp_path / "empty", RGB32)
    with pytest.raises(ImageFolderError, match="no class sub-folders"):
        open_images(labelled / "cat", RGB32, labelled=True)
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ImageFolderError, match=r"bad\.npz has no 'images'"):
        open_images(tmp_path / "bad.npz", RGB32)


def test_unreadable_files_are_skipped_and_counted(labelled: Path) -> None:
    (labelled / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (labelled / "cat" / "empty.jpg").write_bytes(b"")
    images = open_images(labelled, RGB32, labelled=True)
    pixels, labels = images.load(progress=False)
    assert len(pixels) == len(images) - 2 == len(labels)
    assert sorted(Path(path).name for path, _ in images.skipped) == ["broken.png", "empty.jpg"]


def test_npz_images_match_the_same_pixels_as_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=gray, labels=np.arange(5) % 2)
    images = open_images(tmp_path / "set.npz", GRAY28, ["a", "b"], labelled=True)
    x, labels, _ = next(images.batches(progress=False))
    for row, pixels in zip(x, gray, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        assert torch.equal(row, normalise(decode_image(buffer.getvalue(), GRAY28)[None],
                                          GRAY28)[0])
    assert labels.tolist() == [0, 1, 0, 1, 0]


def test_images_needed_for_a_half_point_answer() -> None:
    assert images_needed(1.0, 0.5) == 1537   # 1.96² · 0.01 / 0.005²
    assert images_needed(0.5, 0.5) < images_needed(2.0, 0.5) < images_needed(2.0, 0.25)


STREAM = r"""
import json, sys, psutil
from grad2.config import InputConfig
from grad2.tools.images import open_images
spec = InputConfig.from_dict({"channels": 3, "height": 96, "width": 96})
images = open_images(sys.argv[1], spec)
process = psutil.Process()
start = process.memory_info().rss
count, quarter_peak, peak = 0, start, start
for x, _, _ in images.batches(batch_size=64, progress=False):
    count += len(x)
    peak = max(peak, process.memory_info().rss)
    if count <= len(images) // 4:
        quarter_peak = peak
print(json.dumps({"count": count, "growth_mb": (peak - start) / 2**20,
                  "after_first_quarter_mb": (peak - quarter_peak) / 2**20}))
"""


def test_streaming_keeps_memory_flat_on_a_large_folder(tmp_path: Path) -> None:
    """4,000 files at 3x96x96: held as model input they would take 442 MB. Streamed in
    batches of 64 (7 MB each), memory reaches its level in the first quarter of the folder
    (allocator caches, one batch in flight) and stays there, give or take a few batches of
    allocator slack, for the other three quarters, which held would add 332 MB."""
    folder = tmp_path / "many"
    for shard in range(8):
        (folder / f"shard{shard}").mkdir(parents=True)
    gradient = np.tile(np.arange(96, dtype=np.uint8), (96, 1))
    for index in range(4000):
        picture = np.stack([gradient, gradient.T, np.full_like(gradient, index % 256)], -1)
        Image.fromarray(picture, mode="RGB").save(folder / f"shard{index % 8}" / f"{index}.png")
    result = subprocess.run([sys.executable, "-c", STREAM, str(folder)], capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["count"] == 4000
    assert report["growth_mb"] < 110, report          # a quarter of holding them all
    batch_mb = 64 * 3 * 96 * 96 * 4 / 2**20
    # flat: at most five batches of slack (CPUs differ: 0-7 MB here, 15 MB on CI's EPYC)
    assert report["after_first_quarter_mb"] < 5 * batch_mb, report
