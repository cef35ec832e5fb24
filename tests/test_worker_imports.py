"""What the TorchServe worker imports: the handler module, loading a model and defending a
batch must not import the lab (``grad2.lab``), the operator's tools (``grad2.tools``) or
their dependencies (matplotlib, tqdm, requests, scipy). Run in a fresh interpreter with
those imports made to fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from grad2.models import build_model, save_checkpoint
from grad2.serve.archive import stage_archive_files
from grad2.serve.templates import template_path

FORBIDDEN = ("matplotlib", "tqdm", "requests", "scipy", "grad2.lab", "grad2.tools")

PROBE = r"""
import importlib.abc, importlib.util, json, sys
forbidden = tuple(sys.argv[3].split(","))
# What the worker cannot avoid loads first (torch imports tqdm when it can: not allowed
# here, so torch runs without it, as a fleet without the lab extra would).
for name in forbidden:
    sys.modules[name] = None
import numpy, PIL.Image, torch, torchvision, yaml  # noqa: E401
import ts.torch_handler.base_handler  # noqa: F401

attempts = []

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("grad2.lab", "grad2.tools") or name.startswith((
                "grad2.lab.", "grad2.tools.", "matplotlib", "tqdm", "requests", "scipy")):
            attempts.append(name)
            raise ImportError(f"the worker must not import {name}")
        return None

sys.meta_path.insert(0, Refuse())
model_dir = sys.argv[1]
spec = importlib.util.spec_from_file_location("grad2_handler", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
(handler_class,) = [value for value in vars(module).values()
                    if isinstance(value, type) and value.__module__ == module.__name__]

class Context:
    model_name = "m"
    manifest = {"model": {"modelName": "m", "modelVersion": "1", "serializedFile": "victim.pt"}}
    system_properties = {"model_dir": model_dir, "gpu_id": None, "batch_size": 4}
    model_yaml_config = yaml.safe_load(open(model_dir + "/model-config.yaml"))
    metrics = None
    statuses = {}
    def get_all_request_header(self, idx):
        return {}
    def set_response_status(self, code=200, phrase="", idx=0):
        self.statuses[idx] = code
    def set_response_content_type(self, idx, value):
        pass

handler = handler_class()
handler.initialize(Context())
answers = handler.handle([{"body": {"tensor": [[0.5] * 28] * 28}}] * 3, Context())
print(json.dumps({
    "attempts": attempts,
    "loaded": sorted(name for name in sys.modules if sys.modules[name] is not None
                     and name.startswith(forbidden)),
    "grad2": sorted(name for name, module in sys.modules.items()
                    if name.startswith("grad2") and module is not None),
    "answers": answers,
}))
"""


def staged_model_dir(folder: Path) -> Path:
    """An unpacked archive in ``folder``: random ``small_cnn`` victim and surrogate, the
    shipped ``grad2`` example at batch size 4."""
    torch.manual_seed(0)
    save_checkpoint(build_model("small_cnn"), folder / "victim.pt")
    torch.manual_seed(1)
    save_checkpoint(build_model("small_cnn"), folder / "surrogate.pt")
    config = yaml.safe_load(template_path("model-configs/grad2.yaml").read_text())
    config["batchSize"] = 4
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    model_dir = folder / "model_dir"
    stage_archive_files(model_dir, folder / "config.yaml", folder / "victim.pt",
                        folder / "surrogate.pt")
    return model_dir


def test_worker_imports_no_lab_or_tools_code_or_their_dependencies(tmp_path: Path) -> None:
    model_dir = staged_model_dir(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(model_dir), str(template_path("grad2_handler.py")),
         ",".join(FORBIDDEN)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["attempts"] == []
    assert report["loaded"] == []
    assert not [name for name in report["grad2"] if name.startswith(("grad2.lab", "grad2.tools"))]
    assert "grad2.serve.handler" in report["grad2"] and "grad2.defenses" in report["grad2"]
    # Nor the packaging and server tools: the worker runs handler, codec, loader and core.
    assert "grad2.serve.archive" not in report["grad2"]
    assert "grad2.serve.server" not in report["grad2"]
    # The worker really answered: three defended probability vectors.
    assert len(report["answers"]) == 3
    for answer in report["answers"]:
        assert abs(sum(answer.values()) - 1) < 1e-5


def test_serving_commands_run_without_the_lab_extra(tmp_path: Path) -> None:
    """``grad2 archive --help`` and ``grad2 serve --stop`` with matplotlib, tqdm, requests
    and scipy unimportable (a host with only the ``serve`` extra)."""
    script = (
        "import sys\n"
        f"for name in {list(FORBIDDEN)!r}: sys.modules[name] = None\n"
        "from grad2.cli import main\n"
        f"assert main(['serve', '--stop', '--workdir', {str(tmp_path)!r}]) == 0\n"
        "try:\n"
        "    main(['archive', '--help'])\n"
        "except SystemExit as end:\n"
        "    assert end.code == 0\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--victim" in result.stdout


KSERVE_PROBE = r"""
import asyncio, importlib.abc, json, sys
# The lab, the tools, matplotlib and scipy are refused from the start. The kserve SDK
# itself imports requests (through kubernetes) and, with pandas, tqdm: out of this
# package's hands, so those two are refused only once kserve is loaded; from then on any
# import of them (module or function level) by grad2 code fails.
for name in ("matplotlib", "scipy", "grad2.lab", "grad2.tools"):
    sys.modules[name] = None
import numpy, PIL.Image, torch, torchvision, yaml  # noqa: E401
import kserve  # noqa: F401
for name in ("requests", "tqdm"):
    sys.modules[name] = None

attempts = []

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("grad2.lab", "grad2.tools", "matplotlib", "tqdm", "requests",
                            "scipy", "ts.", "grad2.serve.archive", "grad2.serve.server")):
            attempts.append(name)
            raise ImportError(f"the predictor must not import {name}")
        return None

sys.meta_path.insert(0, Refuse())
from grad2.serve.kserve import Grad2Predictor
predictor = Grad2Predictor("m", sys.argv[1])
predictor.load()
body = {"instances": [{"tensor": [[0.5] * 28] * 28}] * 3}
answer = asyncio.run(predictor.predict(body, {"content-type": "application/json"}))
print(json.dumps({
    "attempts": attempts,
    "grad2": sorted(name for name, module in sys.modules.items()
                    if name.startswith("grad2") and module is not None),
    "ts": sorted(name for name in sys.modules if name == "ts" or name.startswith("ts.")),
    "answers": answer["predictions"],
}))
"""


def test_kserve_predictor_imports_no_lab_or_tools_code(tmp_path: Path) -> None:
    """The KServe predictor loads an archive and answers a v1 request in a fresh
    interpreter with the lab, the tools, matplotlib and scipy unimportable (and requests
    and tqdm once kserve has loaded them), without TorchServe's ``ts``."""
    model_dir = staged_model_dir(tmp_path)
    result = subprocess.run([sys.executable, "-c", KSERVE_PROBE, str(model_dir)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["attempts"] == []
    assert not [name for name in report["grad2"] if name.startswith(("grad2.lab", "grad2.tools"))]
    assert "grad2.serve.kserve" in report["grad2"] and "grad2.serve.pipeline" in report["grad2"]
    assert "grad2.serve.archive" not in report["grad2"]
    assert "grad2.serve.server" not in report["grad2"]
    assert "grad2.serve.handler" not in report["grad2"] and report["ts"] == []
    assert len(report["answers"]) == 3
    for answer in report["answers"]:
        assert abs(sum(answer.values()) - 1) < 1e-5


def test_operator_tools_load_without_the_lab() -> None:
    """``grad2 tune``, ``target``, ``gate``/``keygen`` and ``verify`` import no lab code
    until a lab path is asked for (a simulated thief, the demo's pools, a URL suspect)."""
    probe = ("import sys, grad2.tools.tune, grad2.tools.target_files, grad2.tools.gate_files, "
             "grad2.tools.ownership, grad2.tools.images; "
             "print(sorted(m for m in sys.modules if m.startswith('grad2.lab')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
