"""The TorchServe worker's import closure and memory: a fresh process imports an archive's
handler entry file and initialises it on the unpacked archive (two random small_cnn, GRAD²
all_ones), then a real TorchServe serves the archive and its worker's RSS is read after 20
requests. Prints the modules the handler added (grad2's by name) and both RSS figures.

Run: ``.venv/bin/python scripts/worker_footprint.py``
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import requests
import torch
import yaml
from PIL import Image

from grad2.models import build_model, save_checkpoint
from grad2.serve import Ports, build_archive, start_server, stop_server

PROBE = """
import importlib.util, json, resource, sys, yaml
model_dir, handler_file = sys.argv[1], sys.argv[2]
sys.path.insert(0, model_dir)
before = set(sys.modules)
spec = importlib.util.spec_from_file_location("grad2_handler", handler_file)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
(handler_class,) = [v for v in vars(module).values()
                    if isinstance(v, type) and v.__module__ == module.__name__]
class Context:
    model_name = "m"
    manifest = {"model": {"modelName": "m", "modelVersion": "1.0",
                          "serializedFile": "victim.pt"}}
    system_properties = {"model_dir": model_dir, "gpu_id": None, "batch_size": 8}
    model_yaml_config = yaml.safe_load(open(model_dir + "/model-config.yaml"))
    metrics = None
handler_class().initialize(Context())
added = sorted(name for name in sys.modules if name not in before)
print(json.dumps({"modules": len(added),
                  "grad2": [name for name in added if name.startswith("grad2")],
                  "lab_dependencies": [name for name in ("matplotlib", "requests", "scipy")
                                       if name in sys.modules],
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="grad2-footprint-"))
    torch.manual_seed(0)
    save_checkpoint(build_model("small_cnn"), work / "victim.pt")
    torch.manual_seed(1)
    save_checkpoint(build_model("small_cnn"), work / "surrogate.pt")
    config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 5,
              "responseTimeout": 60,
              "defense": {"method": "grad2", "epsilon": 0.5, "target": "all_ones",
                          "surrogate": "surrogate.pt"},
              "input": {"channels": 1, "height": 28, "width": 28, "mean": [0.286],
                        "std": [0.353], "threads": 1}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    archive = build_archive(name="m", version="1.0", victim=work / "victim.pt",
                            config=work / "config.yaml", export_path=work / "store",
                            surrogate=work / "surrogate.pt")
    unpacked = work / "unpacked"
    zipfile.ZipFile(archive).extractall(unpacked)
    manifest = json.loads((unpacked / "MAR-INF" / "MANIFEST.json").read_text())
    handler_file = unpacked / manifest["model"]["handler"]
    probe = subprocess.run([sys.executable, "-c", PROBE, str(unpacked), str(handler_file)],
                           capture_output=True, text=True, check=True, cwd=work)
    print(probe.stdout.strip().splitlines()[-1])
    server = start_server(work / "store", ["m=m.mar"], workdir=work / "ts", ports=Ports.free())
    try:
        buffer = io.BytesIO()
        Image.new("L", (28, 28), 128).save(buffer, "PNG")
        headers = {"Authorization": f"Bearer {server.tokens().inference}",
                   "Content-Type": "application/octet-stream"}
        statuses = [requests.post(f"{server.inference_url}/predictions/m",
                                  data=buffer.getvalue(), headers=headers, timeout=60
                                  ).status_code for _ in range(20)]
        workers = [p for p in server.processes()[1:]
                   if "model_service_worker" in " ".join(p.cmdline())]
        print(json.dumps({"statuses": sorted(set(statuses)),
                          "worker_rss_mb": [round(p.memory_info().rss / 2**20, 1)
                                            for p in workers]}))
    finally:
        stop_server(server.workdir)


if __name__ == "__main__":
    main()
