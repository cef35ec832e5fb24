"""A defense added from outside the package (one class plus :func:`register`) is validated,
packed and served through the handler with no other file touched: its own keys, its own
packed file, its own errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from grad2.config import ConfigError, number, packed_file
from grad2.defenses import DEFENSES, Defense, keys_table, parse_config, register
from grad2.models import build_model, save_checkpoint
from grad2.serve.archive import stage_archive_files
from tests.test_handler import (
    as_vector,
    clean_answer,
    keep_threads,  # noqa: F401 (a fixture)
    load_handler_class,
    make_handler,
    model_config,
    png_bytes,
)


class Blend(Defense):
    """Toy defense: ``ỹ = (1 − s) y + s v`` for a fixed vector ``v`` read from the archive."""

    method = "blend"
    params = (
        number("strength", 0.25, 0.0, 1.0, "s, how much of the fixed vector"),
        packed_file("vector_file", "the fixed vector v, a [K] tensor",
                    lambda path, surrogate: torch.load(path, weights_only=True)),
    )

    def __init__(self, strength: float, vector: Tensor) -> None:
        if vector.ndim != 1 or (vector < 0).any() or abs(float(vector.sum()) - 1) > 1e-6:
            raise ValueError("vector must be a probability vector")
        self.strength, self.vector = float(strength), vector

    @classmethod
    def check_params(cls, params) -> None:
        if params["vector_file"] is None:
            raise ConfigError("defense.vector_file", "blend needs its vector file")

    @classmethod
    def from_config(cls, params, surrogate, files) -> Blend:
        try:
            return cls(params["strength"], files["vector_file"])
        except ValueError as error:
            raise ConfigError("defense.vector_file", str(error)) from error

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        return torch.lerp(probs, self.vector.to(probs).expand_as(probs), self.strength)


@pytest.fixture()
def blend() -> Iterator[type[Blend]]:
    register(Blend)
    yield Blend
    del DEFENSES[Blend.method]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    save_checkpoint(build_model("small_cnn"), tmp_path / "victim.pt")
    vector = torch.softmax(torch.arange(10, dtype=torch.float32), 0)
    torch.save(vector, tmp_path / "vector.pt")
    return {"victim": tmp_path / "victim.pt", "vector": tmp_path / "vector.pt"}


def blend_config(**defense) -> dict:
    config = model_config()
    config["defense"] = {"method": "blend", "surrogate": None, "vector_file": "vector.pt",
                         **defense}
    return config


@pytest.mark.usefixtures("keep_threads")
def test_a_registered_defense_is_packed_and_served(blend, files, tmp_path):
    config = blend_config(strength=0.5)
    config_path = tmp_path / "model-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    staged = tmp_path / "archive"
    stage_archive_files(staged, config_path, files["victim"],
                        files={"vector_file": files["vector"]})
    assert (staged / "vector.pt").is_file()

    handler, context = make_handler(load_handler_class(), staged, config)
    assert isinstance(handler.served.defense, Blend)
    image = png_bytes(3)
    [answer] = handler.handle([{"body": bytearray(image)}], context)
    vector = as_vector(answer, handler.served.class_names)
    clean = clean_answer(handler, image)
    expected = torch.lerp(clean, torch.load(files["vector"]), 0.5)
    torch.testing.assert_close(vector, expected.double(), rtol=0, atol=1e-7)
    assert "`strength` | blend" in keys_table()


@pytest.mark.parametrize(("defense", "key"), [
    ({"strength": 2.0}, "defense.strength"),
    ({"vector_file": None}, "defense.vector_file"),
    ({"epsilon": 0.5}, "defense.epsilon"),
])
def test_a_registered_defense_names_its_bad_keys(blend, defense, key):
    with pytest.raises(ConfigError) as raised:
        parse_config(blend_config(**defense)["defense"])
    assert raised.value.key == key


def test_its_file_is_required_when_packing(blend, files, tmp_path):
    config_path = tmp_path / "model-config.yaml"
    config_path.write_text(yaml.safe_dump(blend_config()))
    with pytest.raises(ConfigError, match="--file vector_file=PATH") as raised:
        stage_archive_files(tmp_path / "archive", config_path, files["victim"])
    assert raised.value.key == "defense.vector_file"


def test_register_refuses_a_taken_name_or_a_common_key(blend):
    class Clash(Blend):
        pass

    with pytest.raises(ValueError, match="already served"):
        register(Clash)

    class Shadow(Defense):
        method = "shadow"
        params = (number("topk", 1, 0, 5, "clashes with the common key"),)

        def defend(self, x, probs):
            return probs

    with pytest.raises(ValueError, match="common keys: topk"):
        register(Shadow)
    assert "shadow" not in DEFENSES
