"""Client-side helpers of the integration tests: images, HTTP and gRPC calls, checks."""

from __future__ import annotations

import base64
import importlib
import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import requests
from PIL import Image

CLASS_NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
               "bag", "boot"]
TIMEOUT = 30


def png(seed: int, size: tuple[int, int] = (28, 28)) -> bytes:
    """A random grayscale PNG."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` pixels (a decompression bomb's
    shape: decoding it fully would need ``width * height`` bytes)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 65536)) + chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def vector(answer: dict[str, float]) -> np.ndarray:
    """An all-classes answer as float64 ``[K]`` in class-index order."""
    assert list(answer) == CLASS_NAMES, answer
    return np.array([answer[name] for name in CLASS_NAMES], dtype=np.float64)


def assert_on_simplex(answer: np.ndarray) -> None:
    assert answer.shape == (len(CLASS_NAMES),)
    assert np.isfinite(answer).all() and answer.min() >= 0
    assert abs(answer.sum() - 1) < 1e-5


def post(url: str, token: str | None, data: Any = None, json_body: Any = None,
         headers: dict[str, str] | None = None, files: Any = None) -> requests.Response:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    return requests.post(url, data=data, json=json_body, headers=all_headers, files=files,
                         timeout=TIMEOUT)


def predict_raw(base_url: str, path: str, token: str, image: bytes) -> requests.Response:
    return post(f"{base_url}{path}", token, data=image,
                headers={"Content-Type": "application/octet-stream"})


def answer_of(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, (response.status_code, response.text[:300])
    return vector(response.json())


# --------------------------------------------------------------------------- gRPC


def build_grpc_stubs(folder: Path) -> tuple[ModuleType, ModuleType]:
    """Generate TorchServe's inference gRPC client from the ``.proto`` files shipped inside
    ``ts/frontend/model-server.jar`` into ``folder``; returns ``(pb2, pb2_grpc)``."""
    import grpc_tools
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(jar) as bundle:
        for name in ("inference.proto", "google/rpc/status.proto"):
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(bundle.read(name))
    include = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{folder}", f"-I{include}",
         f"--python_out={folder}", f"--grpc_python_out={folder}",
         "inference.proto", "google/rpc/status.proto"],
        cwd=folder, check=True, capture_output=True,
    )
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")


def grpc_predict(stubs: tuple[ModuleType, ModuleType], target: str, token: str | None,
                 model: str, image: bytes, version: str = "") -> bytes:
    """One gRPC ``Predictions`` call; returns the prediction bytes (raises
    ``grpc.RpcError`` on refusal)."""
    import grpc

    pb2, pb2_grpc = stubs
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(target) as channel:
        stub = pb2_grpc.InferenceAPIsServiceStub(channel)
        request = pb2.PredictionsRequest(model_name=model, model_version=version,
                                         input={"data": image})
        return stub.Predictions(request, metadata=metadata, timeout=TIMEOUT).prediction


def grpc_answer(stubs: tuple[ModuleType, ModuleType], target: str, token: str, model: str,
                image: bytes, version: str = "") -> np.ndarray:
    return vector(json.loads(grpc_predict(stubs, target, token, model, image, version)))
