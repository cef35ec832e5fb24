"""grad2.lab.data: IDX parsing, restricted unpickling, the real datasets when cached."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from grad2.lab import data
from grad2.lab.data import (
    FASHION_MEAN,
    FASHION_STD,
    DataError,
    Dataset,
    RestrictedUnpickler,
    parse_idx,
    read_idx,
    restricted_load_array,
    to_tensor,
)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_fashion_folder(folder: Path, train: int = 60_000, test: int = 10_000,
                         label_value: int | None = None, compress: bool = True) -> None:
    """Four synthetic IDX files with Fashion-MNIST's names and the given sizes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        if label_value is not None:
            labels[-1] = label_value
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            raw = idx_bytes(array)
            if compress:
                (folder / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(raw, compresslevel=1))
            else:
                (folder / f"{prefix}-{kind}").write_bytes(raw)


# --------------------------------------------------------------------------- IDX


def test_parse_idx_round_trip_uint8_and_big_endian_int() -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(images)), images)
    ints = np.array([[1, -2, 70000]], dtype=">i4")
    parsed = parse_idx(idx_bytes(ints, 0x0C))
    assert parsed.dtype == np.int32 and parsed.dtype.isnative
    np.testing.assert_array_equal(parsed, [[1, -2, 70000]])


def test_read_idx_detects_gzip_from_content(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "plain").write_bytes(idx_bytes(labels))
    (tmp_path / "packed").write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(read_idx(tmp_path / "plain"), labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed"), labels)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "bad magic"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown IDX element type"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00" * 4, "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00" * 6, "trailing bytes"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
    ],
)
def test_parse_idx_rejects_corrupt_files(raw: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message) as caught:
        parse_idx(raw, "bad.idx")
    assert "bad.idx" in str(caught.value)


def test_read_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    packed = gzip.compress(idx_bytes(np.zeros(100, np.uint8)))
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "cut.gz")


def test_fashion_loader_reads_any_folder_and_checks_sizes(tmp_path: Path) -> None:
    write_fashion_folder(tmp_path / "ok", train=600, test=10_000, compress=False)
    test = data.load_fashion_mnist("test", data_dir=tmp_path / "ok")
    assert test.images.shape == (10_000, 28, 28) and test.labels.dtype == np.int64
    assert test.class_names[0] == "T-shirt/top" and test.class_names[9] == "Ankle boot"
    with pytest.raises(DataError, match=r"expected uint8 images of shape \(60000, 28, 28\)"):
        data.load_fashion_mnist("train", data_dir=tmp_path / "ok")

    write_fashion_folder(tmp_path / "badlabel", train=1, label_value=10, compress=False)
    with pytest.raises(DataError, match="label 10 out of range"):
        data.load_fashion_mnist("test", data_dir=tmp_path / "badlabel")


def test_missing_fashion_error_names_both_ways(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        data.load_fashion_mnist("train", data_dir=tmp_path)
    message = str(caught.value)
    assert "dataset-fashion-mnist" in message and "GRAD2_DATA_DIR" in message
    with pytest.raises(DataError):  # an explicit folder is never silently replaced by a fetch
        data.fetch_fashion_mnist(tmp_path)


def test_cache_dir_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAD2_CACHE", str(tmp_path / "new" / "cache"))
    assert data.cache_dir() == tmp_path / "new" / "cache"
    assert data.cache_dir().is_dir()
    monkeypatch.delenv("GRAD2_CACHE")
    repo_root = Path(data.__file__).resolve().parents[2]
    assert data.cache_dir() == repo_root / ".cache"  # tests run from a source checkout


# --------------------------------------------------------------------------- unpickling


class _CallsSystem:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code_execution() -> None:
    malicious = pickle.dumps(_CallsSystem())
    with pytest.raises(pickle.UnpicklingError, match="system"):
        RestrictedUnpickler(io.BytesIO(malicious)).load()
    with pytest.raises(DataError, match="only numpy arrays"):
        restricted_load_array(malicious, "evil.pkl")
    sneaky = pickle.dumps({"array": np.zeros(3), "call": _CallsSystem()})
    with pytest.raises(DataError):
        restricted_load_array(sneaky)


def test_restricted_unpickler_accepts_numeric_arrays_only() -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    for protocol in (3, 4):  # the Animal-MNIST files use protocol 4
        np.testing.assert_array_equal(restricted_load_array(pickle.dumps(images, protocol)), images)
    labels = np.array([0, 9, 3], dtype=np.int64)
    np.testing.assert_array_equal(restricted_load_array(pickle.dumps(labels)), labels)
    with pytest.raises(DataError, match="numeric numpy array"):
        restricted_load_array(pickle.dumps(np.array(["a", None], dtype=object)))
    with pytest.raises(DataError, match="numeric numpy array"):
        restricted_load_array(pickle.dumps([1, 2, 3]))


# --------------------------------------------------------------------------- tensors, pools


def test_to_tensor_shape_and_normalisation() -> None:
    images = np.array([[[0, 255]] * 2], dtype=np.uint8)  # [1, 2, 2]
    tensor = to_tensor(images)
    assert tensor.shape == (1, 1, 2, 2) and tensor.dtype == torch.float32
    assert tensor[0, 0, 0, 0].item() == pytest.approx(-FASHION_MEAN / FASHION_STD, abs=1e-6)
    assert tensor[0, 0, 0, 1].item() == pytest.approx((1 - FASHION_MEAN) / FASHION_STD, abs=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(np.zeros((1, 28, 28), np.float32))


def test_dataset_validates_and_subsets() -> None:
    images = np.zeros((4, 28, 28), np.uint8)
    dataset = Dataset(images, np.arange(4, dtype=np.int64), ["a", "b", "c", "d"], "toy")
    part = dataset.subset(np.array([3, 1]))
    assert len(part) == 2 and part.labels.tolist() == [3, 1] and part.name == "toy"
    with pytest.raises(ValueError, match="labels"):
        Dataset(images, np.arange(3, dtype=np.int64), ["a"])
    with pytest.raises(ValueError, match="uint8"):
        Dataset(images.astype(np.float32), None, ["a"])


def test_unknown_pool_is_an_error() -> None:
    with pytest.raises(ValueError, match="animal, fashion_heldout"):
        data.thief_pool("cifar100")


# --------------------------------------------------------------------------- real data


def _real_fashion_present() -> bool:
    try:
        data.find_fashion_dir()
    except DataError:
        return False
    return True


needs_fashion = pytest.mark.skipif(not _real_fashion_present(),
                                   reason="Fashion-MNIST not fetched (run `grad2 fetch-data`)")
needs_animal = pytest.mark.skipif(not (data.cache_dir() / data.ANIMAL_NPZ).is_file(),
                                  reason="Animal-MNIST not fetched (run `grad2 fetch-data`)")


@needs_fashion
def test_real_fashion_mnist_and_its_splits() -> None:
    train = data.load_fashion_mnist("train")
    test = data.load_fashion_mnist("test")
    assert train.images.shape == (60_000, 28, 28) and test.images.shape == (10_000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    pixels = torch.from_numpy(train.images).flatten(1).float() / 255
    count = pixels.numel()
    mean = pixels.sum(1).double().sum().item() / count
    second_moment = pixels.square().sum(1).double().sum().item() / count
    assert mean == pytest.approx(FASHION_MEAN, abs=1e-4)
    assert (second_moment - mean**2) ** 0.5 == pytest.approx(FASHION_STD, abs=1e-4)
    victim = data.victim_train_split()
    heldout = data.thief_pool("fashion_heldout")
    assert len(victim) == 50_000 and len(heldout) == 10_000
    assert victim.images.tobytes() == train.images[:50_000].tobytes()
    assert heldout.images.tobytes() == train.images[50_000:].tobytes()


@needs_animal
def test_real_animal_mnist_matches_fashion_polarity() -> None:
    animal = data.load_animal_mnist()
    assert animal.images.shape == (10_000, 28, 28) and animal.images.dtype == np.uint8
    assert np.bincount(animal.labels).tolist() == [1000] * 10
    assert animal.class_names[0] == "Bear" and animal.class_names[-1] == "Zebra"
    # Dark border, bright centre, as in Fashion-MNIST.
    assert animal.images[:, 0, :].mean() < 20 < 100 < animal.images[:, 10:18, 10:18].mean()
    subset = data.thief_pool("animal", size=100, seed=3)
    again = data.thief_pool("animal", size=100, seed=3)
    other = data.thief_pool("animal", size=100, seed=4)
    assert len(subset) == 100
    np.testing.assert_array_equal(subset.images, again.images)
    assert not np.array_equal(subset.labels, other.labels)
    with pytest.raises(ValueError, match="pool size"):
        data.thief_pool("animal", size=10_001)
