"""Hostile and unusual images through the handler (a fake TorchServe context): each gets
its own clear 4xx, or, where the image is decodable and sane, a defended answer, within
bounded time and memory (peak RSS growth sampled with psutil while the request runs).

What a client gets, per case (also in docs/security.md, "Measured"):

- header claims over ``input.max_side`` (PNG, GIF, TIFF, JPEG, BMP, WebP): 413 before a
  pixel is decoded; a 0x0 or 0-byte image: 400; truncated data: 400; formats outside
  ``IMAGE_FORMATS`` (EPS, PSD, SVG, ICO): 400, never handed to an external program;
- a zlib bomb inside a PNG's IDAT (1 GB of zeros behind a 1024x1024 header) or zTXt
  chunk: decoding stops at the image's end (a defended answer) or PIL's text-chunk limit
  (400), with little memory either way;
- 1x1, palette (with transparency), LA/RGBA (alpha dropped, not composited), CMYK JPEG,
  bilevel, YCbCr and LAB TIFF: a defended answer of the image converted to the model's
  channels and resized to its input size;
- animated GIF/PNG and multi-page TIFF: the first frame/page is classified;
- 16-bit PNG/TIFF/PGM (``I;16*``, ``I``): scaled to 8 bits (``v / 257``), so the answer
  equals the 8-bit image's; 32-bit values outside 0..65535 and float images (``F``): 415.
"""

from __future__ import annotations

import importlib.util
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from grad2.config import InputConfig
from grad2.models import build_model, save_checkpoint
from grad2.serve import codec, loader

HANDLER_FILE = Path(__file__).resolve().parents[1] / "handler" / "grad2_handler.py"
EPSILON = 0.5
MAX_SIDE = 1024
#: Bounds per request; generous for a shared 2-core CI machine, tiny next to a real bomb
#: (the 100000x100000 header alone would need 10 GB to decode).
SECONDS_LIMIT = 5.0
RSS_LIMIT_MB = 100.0
#: ``max_request_size`` of config/config.properties.
MAX_REQUEST_SIZE = 6_553_500


# --------------------------------------------------------------------------- handler


class FakeContext:
    """The parts of TorchServe's ``Context`` the handler uses."""

    def __init__(self, model_dir: Path, config: dict[str, Any]) -> None:
        self.model_name = "fashion"
        self.manifest = {"model": {"modelName": "fashion", "modelVersion": "1.0",
                                   "serializedFile": "victim.pt"}}
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None,
                                  "batch_size": 8}
        self.model_yaml_config = config
        self.metrics = None
        self.request_headers: list[dict[str, Any]] = []
        self.statuses: dict[int, tuple[int, str]] = {}

    def get_all_request_header(self, idx: int) -> dict[str, Any]:
        return self.request_headers[idx] if idx < len(self.request_headers) else {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass

    def status(self, idx: int) -> int:
        return self.statuses.get(idx, (200, ""))[0]


def model_config(epsilon: float = EPSILON) -> dict[str, Any]:
    return {
        "batchSize": 8,
        "defense": {"method": "grad2", "epsilon": epsilon, "target": "all_ones",
                    "surrogate": "surrogate.pt"},
        "input": {"channels": 1, "height": 28, "width": 28, "mean": [0.286], "std": [0.353],
                  "max_side": MAX_SIDE, "threads": 1},
    }


def write_models(folder: Path) -> Path:
    """Random-init victim and surrogate checkpoints, as the integration fixtures make."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_checkpoint(build_model("small_cnn"), folder / "victim.pt")
    torch.manual_seed(1)
    save_checkpoint(build_model("small_cnn"), folder / "surrogate.pt")
    return folder


def build_handler(model_dir: Path, epsilon: float = EPSILON) -> Any:
    """A ``Grad2Handler`` initialised on ``model_dir`` with a fake context."""
    spec = importlib.util.spec_from_file_location("grad2_handler_under_test", HANDLER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    handler = module.Grad2Handler()
    handler.initialize(FakeContext(model_dir, model_config(epsilon)))
    torch.set_num_threads(threads)  # initialize sets one thread per worker process
    return handler


def clean_probabilities(handler: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The victim's undefended answer to ``pixels`` ``[N, C, H, W]`` (test-side)."""
    x = codec.normalise(pixels, handler.served.input_config)
    return loader.clean_probabilities(handler.model, x)


def answer_vector(answer: dict[str, float], handler: Any) -> torch.Tensor:
    return torch.tensor([answer[name] for name in handler.served.class_names],
                        dtype=torch.float64)


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pixel_limit = Image.MAX_IMAGE_PIXELS
    warm = build_handler(write_models(tmp_path_factory.mktemp("models")))
    # torch's first forward and JVP allocate tens of MB once; measure cases after that
    assert send(warm, encode(noise(), "PNG"))[0] == 200
    yield warm
    Image.MAX_IMAGE_PIXELS = pixel_limit  # the handler sets PIL's limit per process


# --------------------------------------------------------------------------- measuring


@contextmanager
def peak_rss_growth() -> Iterator[dict[str, float]]:
    """Sample this process's RSS every 0.5 ms; yields a dict whose ``"mb"`` is the peak
    growth over the RSS at entry once the block has run."""
    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = {"mb": 0.0}
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        result["mb"] = (peak[0] - base) / 2**20


def send(handler: Any, body: bytes) -> tuple[int, Any, float, float]:
    """One raw-body request through ``handle``: ``(status, response, seconds, peak RSS
    growth in MB)``."""
    context = handler.context
    context.statuses.clear()
    context.request_headers = [{"Content-Type": "application/octet-stream"}]
    with peak_rss_growth() as memory:
        started = time.perf_counter()
        [response] = handler.handle([{"body": bytearray(body)}], context)
        seconds = time.perf_counter() - started
    return context.status(0), response, seconds, memory["mb"]


# --------------------------------------------------------------------------- images


def encode(picture: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(mode: str = "L", size: tuple[int, int] = (28, 28), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    shape = (size[1], size[0]) if bands == 1 else (size[1], size[0], bands)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def png_raw(width: int, height: int, idat: bytes, extra: bytes = b"", depth: int = 8,
            colour: int = 0) -> bytes:
    """A PNG from parts: IHDR claiming ``width x height``, ``extra`` chunks, one IDAT."""
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
            + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def zlib_of_zeros(megabytes: int) -> bytes:
    """A zlib stream of ``megabytes`` MB of zeros, built in milliseconds: after a full
    flush every 1 MB block deflates to the same bytes, so one is repeated, then an empty
    final block and the Adler-32 of the zeros (``a = 1``, ``b = n mod 65521``)."""
    compressor = zlib.compressobj(9)
    block = b"\x00" * 2**20
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert again == first[2:]  # the same block without the 2-byte zlib header
    adler = ((megabytes * 2**20 % 65521) << 16) | 1
    return first + again * (megabytes - 1) + b"\x03\x00" + adler.to_bytes(4, "big")


def idat_bomb() -> bytes:
    """A 1024x1024 grayscale PNG whose IDAT inflates to 1 GB (the image needs 1 MB)."""
    return png_raw(MAX_SIDE, MAX_SIDE, zlib_of_zeros(1024))


def ztxt_bomb() -> bytes:
    """A valid 28x28 PNG carrying a zTXt chunk that inflates to 256 MB of text."""
    text = chunk(b"zTXt", b"Comment\x00\x00" + zlib_of_zeros(256))
    base = encode(noise(), "PNG")
    return base[:33] + text + base[33:]  # right after the IHDR chunk


def gif_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen is ``width x height`` with one 1x1 frame."""
    return (b"GIF89a" + struct.pack("<HH", width, height) + b"\x80\x00\x00"
            + b"\x00\x00\x00\xff\xff\xff"
            + b"," + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00"
            + b"\x02\x02\x44\x01\x00" + b";")


def tiff_raw(tags: list[tuple[int, int, bytes]], count: int = 1) -> bytes:
    """A little-endian TIFF of one IFD: ``(tag, type, 4-byte value)`` entries, then one
    data byte."""
    body = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        body += struct.pack("<HHI", tag, kind, len(value.rstrip(b"\x00")) if kind == 2
                            else count) + value
    return b"II*\x00" + struct.pack("<I", 8) + body + b"\x00\x00\x00\x00" + b"\x80"


def tiff_header(width: int, height: int, offsets: tuple[int, bytes] | None = None) -> bytes:
    """An uncompressed 8-bit grayscale TIFF claiming ``width x height`` pixels with a
    1-byte strip; ``offsets`` replaces the StripOffsets entry's ``(type, value)``."""
    strip = 8 + 2 + 12 * 9 + 4

    def short(value: int) -> bytes:
        return struct.pack("<HH", value, 0)

    def long(value: int) -> bytes:
        return struct.pack("<I", value)

    return tiff_raw([(256, 4, long(width)), (257, 4, long(height)), (258, 3, short(8)),
                     (259, 3, short(1)), (262, 3, short(1)),
                     (273, *(offsets or (4, long(strip)))), (277, 3, short(1)),
                     (278, 4, long(height)), (279, 4, long(1))])


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG with its SOF0 header patched to ``width x height``."""
    data = bytearray(encode(noise(), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(noise(), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def frames(fmt: str, count: int, size: tuple[int, int] = (28, 28)) -> bytes:
    images = [noise("L", size, seed) for seed in range(count)]
    if fmt == "GIF":
        images = [image.convert("P") for image in images]
    return encode(images[0], fmt, save_all=True, append_images=images[1:])


def sixteen_bit(fmt: str) -> tuple[bytes, bytes]:
    """The same picture as a 16-bit image (``v * 257``) in ``fmt`` and as an 8-bit PNG."""
    eight = np.asarray(noise("L", (20, 30), seed=5))
    wide = eight.astype(np.uint16) * 257
    if fmt == "PGM":
        header = f"P5 {wide.shape[1]} {wide.shape[0]} 65535\n".encode()
        data = header + wide.astype(">u2").tobytes()
    elif fmt == "TIFF_BE":
        picture = Image.frombytes("I;16B", wide.shape[::-1], wide.astype(">u2").tobytes())
        data = encode(picture, "TIFF")
    else:
        data = encode(Image.fromarray(wide), fmt)
    return data, encode(Image.fromarray(eight), "PNG")


def transparent_palette() -> bytes:
    picture = noise().convert("P")
    return encode(picture, "PNG", transparency=0)


def multi_page_tiff() -> bytes:
    pages = [noise("L", seed=seed) for seed in range(3)]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def tiff_mode(mode: str, values: Any = None) -> bytes:
    picture = Image.new(mode, (28, 28))
    if values is not None:
        picture = Image.fromarray(np.asarray(values))
    return encode(picture, "TIFF")


#: name -> (bytes factory, expected status; 200 = a defended answer)
CASES: dict[str, tuple[Callable[[], bytes], int]] = {
    # bombs and giant or empty dimensions
    "PNG header 100000x100000": (lambda: png_raw(100_000, 100_000, zlib.compress(b"\0")), 413),
    "PNG 1025x1 (over max_side)": (lambda: encode(noise("L", (1025, 1)), "PNG"), 413),
    "PNG IDAT inflating to 1 GB": (idat_bomb, 200),
    "PNG zTXt inflating to 256 MB": (ztxt_bomb, 400),
    "PNG 1024x1024 RGBA (pixel flood at the limit)": (
        lambda: encode(Image.new("RGBA", (MAX_SIDE, MAX_SIDE), (9, 9, 9, 9)), "PNG"), 200),
    "GIF screen 65535x65535": (lambda: gif_screen(65_535, 65_535), 413),
    "TIFF header 70000x70000": (lambda: tiff_header(70_000, 70_000), 413),
    "JPEG header 65500x65500": (lambda: jpeg_claiming(65_500, 65_500), 413),
    "BMP header 50000x50000": (lambda: bmp_claiming(50_000, 50_000), 413),
    "WebP 1100x4 (over max_side)": (lambda: encode(noise("RGB", (1100, 4)), "WEBP"), 413),
    "PNG 0x0": (lambda: png_raw(0, 0, zlib.compress(b"")), 400),
    # found by fuzz/fuzz_decoding.py: PIL's TIFF loader raised TypeError past decode_image
    "TIFF with text StripOffsets": (lambda: tiff_header(1, 1, (2, b"7\x00\x00\x00")), 400),
    "0 bytes": (lambda: b"", 400),
    "PNG 1x1": (lambda: encode(noise("L", (1, 1)), "PNG"), 200),
    "truncated JPEG": (lambda: encode(noise("L", (200, 200)), "JPEG")[:600], 400),
    # formats that are never opened
    "EPS (would run Ghostscript)": (
        lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n", 400),
    "PSD": (lambda: b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 1, 28, 28, 8, 1), 400),
    "SVG": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', 400),
    "ICO": (lambda: encode(noise("RGB", (16, 16)), "ICO"), 400),
    # frames
    "animated GIF, 3 frames": (lambda: frames("GIF", 3), 200),
    "animated GIF, 500 frames": (lambda: frames("GIF", 500, (8, 8)), 200),
    "animated PNG, 3 frames": (lambda: frames("PNG", 3), 200),
    "multi-page TIFF": (multi_page_tiff, 200),
    # modes
    "CMYK JPEG": (lambda: encode(noise("CMYK"), "JPEG"), 200),
    "palette PNG with transparency": (transparent_palette, 200),
    "LA PNG": (lambda: encode(noise("LA"), "PNG"), 200),
    "RGBA PNG": (lambda: encode(noise("RGBA"), "PNG"), 200),
    "16-bit PNG (I;16)": (lambda: sixteen_bit("PNG")[0], 200),
    "16-bit TIFF (I;16B)": (lambda: sixteen_bit("TIFF_BE")[0], 200),
    "16-bit PGM (I)": (lambda: sixteen_bit("PGM")[0], 200),
    "bilevel TIFF (1)": (lambda: tiff_mode("1"), 200),
    "CMYK TIFF": (lambda: encode(noise("CMYK"), "TIFF"), 200),
    "YCbCr TIFF": (lambda: encode(noise("RGB").convert("YCbCr"), "TIFF"), 200),
    "LAB TIFF": (lambda: encode(noise("RGB").convert("LAB"), "TIFF"), 200),
    "LZW TIFF": (lambda: encode(noise(), "TIFF", compression="tiff_lzw"), 200),
    "32-bit TIFF (I) within 0..65535": (
        lambda: tiff_mode("I", np.full((28, 28), 40_000, np.int32)), 200),
    "32-bit TIFF (I) with negative values": (
        lambda: tiff_mode("I", np.full((28, 28), -7, np.int32)), 415),
    "float TIFF (F)": (lambda: tiff_mode("F", np.full((28, 28), 0.5, np.float32)), 415),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_image_gets_a_clear_answer_in_bounded_time_and_memory(
    handler: Any, case: str
) -> None:
    make, expected = CASES[case]
    body = make()
    assert len(body) < MAX_REQUEST_SIZE  # a body the frontend lets through
    status, response, seconds, rss_mb = send(handler, body)
    print(f"{case}: {status} in {1000 * seconds:.0f} ms, peak RSS +{rss_mb:.1f} MB")
    assert status == expected, (case, status, response)
    assert seconds < SECONDS_LIMIT, f"{case}: {seconds:.2f} s"
    assert rss_mb < RSS_LIMIT_MB, f"{case}: peak RSS grew by {rss_mb:.0f} MB"
    if expected != 200:
        assert set(response) == {"code", "type", "message"} and response["code"] == status
        # refused by the decoder itself, not by the handler's guard for decoder bugs
        with pytest.raises(codec.RequestError) as refused:
            codec.decode_request(body, "application/octet-stream",
                                      handler.served.input_config)
        assert refused.value.status == expected and response["message"] == refused.value.message
        return
    answer = answer_vector(response, handler)
    assert abs(float(answer.sum()) - 1) < 1e-5 and float(answer.min()) >= 0
    pixels = codec.decode_image(body, handler.served.input_config)
    clean = clean_probabilities(handler, pixels[None])[0].double()
    l1 = float((answer - clean).abs().sum())
    assert 1e-6 < l1 <= EPSILON + 1e-5, (case, l1)


def test_first_frame_is_what_gets_classified(handler: Any) -> None:
    """Animated GIF/PNG and multi-page TIFF: the answer is the first frame's."""
    first = noise("L", seed=0)
    for body, still in ((frames("GIF", 3), encode(first.convert("P"), "GIF")),
                        (frames("PNG", 3), encode(first, "PNG")),
                        (multi_page_tiff(), encode(first, "TIFF"))):
        assert send(handler, body)[1] == send(handler, still)[1]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF_BE", "PGM"])
def test_sixteen_bit_images_are_scaled_not_clipped(handler: Any, fmt: str) -> None:
    """PIL converts 16-bit pixels to 8 bits by clipping at 255, which turned a 16-bit
    photograph white; decode_image scales them (v / 257), so the 16-bit image gets the
    same pixels, hence the same answer, as its 8-bit twin."""
    wide, eight = sixteen_bit(fmt)
    spec = handler.served.input_config
    assert torch.equal(codec.decode_image(wide, spec), codec.decode_image(eight, spec))
    assert send(handler, wide)[1] == send(handler, eight)[1]


def test_three_channel_model_takes_the_same_odd_modes() -> None:
    """The conversions also serve a 3-channel model (CMYK, LAB, 16-bit, palette)."""
    spec = InputConfig.from_dict({"channels": 3, "height": 8, "width": 8,
                                             "max_side": MAX_SIDE})
    for body in (encode(noise("CMYK"), "JPEG"), encode(noise("RGB").convert("LAB"), "TIFF"),
                 sixteen_bit("PNG")[0], transparent_palette(), encode(noise("LA"), "PNG")):
        pixels = codec.decode_image(body, spec)
        assert pixels.shape == (3, 8, 8) and 0 <= float(pixels.min()) <= float(pixels.max()) <= 1
