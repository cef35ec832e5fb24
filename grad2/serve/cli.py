"""The ``grad2 archive`` and ``grad2 serve`` sub-commands."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from grad2.serve.archive import DEFAULT_HANDLER, DEFAULT_MODEL_STORE, FILE_OPTIONS, build_archive
from grad2.serve.kserve_server import (
    DEFAULT_KSERVE_WORKDIR,
    KServeServer,
    start_kserve,
    stop_kserve,
)
from grad2.serve.server import (
    DEFAULT_TS_CONFIG,
    DEFAULT_WORKDIR,
    Ports,
    TorchServeServer,
    parse_model_specs,
    start_server,
    stop_server,
)
from grad2.serve.templates import model_config_names, template_path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``archive`` and ``serve`` sub-commands."""
    archive = subparsers.add_parser(
        "archive",
        help="validate a model and its defense config, then pack a TorchServe .mar",
        description="Validate model-config.yaml (defense:, input:) and the files exactly as "
        "the TorchServe worker will, run one test batch, then call torch-model-archiver.",
    )
    archive.add_argument("--name", required=True, help="model name (the URL's NAME)")
    archive.add_argument("--version", required=True, help="model version, e.g. 1.0")
    archive.add_argument("--victim", required=True, type=Path,
                         help="victim state_dict .pt (with its .json metadata beside it)")
    archive.add_argument("--surrogate", type=Path,
                         help="the defense's network .pt (with .json): the surrogate of "
                         "grad2/grad2_gated/mad, the misinformation model of "
                         "adaptive_misinformation")
    archive.add_argument(
        "--config", required=True, type=_model_config,
        help="model-config.yaml, or the name of a shipped example "
        f"({', '.join(model_config_names())}) to start from")
    archive.add_argument("--target", type=Path, help="target tensor file (defense.target_file)")
    archive.add_argument("--mapping-key", type=Path,
                         help="secret key file of the class mapping (defense.mapping_key; "
                         "grad2 keygen writes one)")
    archive.add_argument("--gate-file", type=Path,
                         help="feature gate tensor file (defense.gate_file; grad2 gate writes "
                         "one)")
    archive.add_argument("--file", action="append", default=[], metavar="KEY=PATH",
                         type=_file_option,
                         help="the file of any defense: file key (repeatable), e.g. a key "
                         "a new defense declares")
    archive.add_argument("--index-to-name", type=Path, help="index_to_name.json class names")
    archive.add_argument("--export-path", type=Path, default=DEFAULT_MODEL_STORE,
                         help="model store to write NAME.mar into (default: model_store)")
    archive.add_argument("--archive-name", help="file name of the .mar without suffix "
                         "(default: NAME; use NAME-VERSION to keep several versions)")
    archive.add_argument("--handler", type=Path, default=DEFAULT_HANDLER,
                         help="handler file (default: the checkout's handler/grad2_handler.py)")
    archive.add_argument("--force", action="store_true", help="replace an existing .mar")
    archive.set_defaults(func=_archive_command)

    serve = subparsers.add_parser(
        "serve",
        help="start (or --stop) TorchServe or KServe with defended models, wait until READY",
        description="Start TorchServe on 127.0.0.1 with token authorization on and the "
        "model API off (or, with --runtime kserve, KServe's model server for one archive, "
        "without authentication), wait until every model is READY, print the endpoints.",
    )
    serve.add_argument("--runtime", choices=("torchserve", "kserve"), default="torchserve",
                       help="model server: TorchServe (default) or KServe's Python model "
                       "server (one archive; needs the kserve extra)")
    serve.add_argument("--model-store", type=Path, default=DEFAULT_MODEL_STORE)
    serve.add_argument("--models", nargs="+", metavar="NAME=FILE.mar",
                       help="archives to serve (default: every .mar in the store)")
    serve.add_argument("--ts-config", type=Path, default=DEFAULT_TS_CONFIG,
                       help="config.properties template (default: config/config.properties)")
    serve.add_argument("--workdir", type=Path, default=None,
                       help="server state: logs, temp files, key_file.json (default: "
                       f"{DEFAULT_WORKDIR}, or {DEFAULT_KSERVE_WORKDIR} for KServe)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    defaults = Ports()
    for field in fields(Ports):
        flag = "--" + field.name.replace("_", "-") + "-port"
        serve.add_argument(flag, dest=f"{field.name}_port", type=int,
                           default=getattr(defaults, field.name))
    serve.add_argument("--free-ports", action="store_true",
                       help="pick five free ports instead of the defaults")
    serve.add_argument("--timeout", type=float, default=180.0,
                       help="seconds to wait for READY (default 180)")
    serve.add_argument("--stop", action="store_true",
                       help="stop the server of --workdir and wait for its processes")
    serve.set_defaults(func=_serve_command)


def _model_config(value: str) -> Path:
    """A ``model-config.yaml`` path, or a shipped example's name (``grad2``, ``none``...)."""
    path = Path(value)
    if not path.exists() and value in model_config_names():
        return template_path(f"model-configs/{value}.yaml")
    return path


def _file_option(value: str) -> tuple[str, Path]:
    key, separator, path = value.partition("=")
    if not separator or not key or not path:
        raise argparse.ArgumentTypeError(f"expected KEY=PATH, got {value!r}")
    return key, Path(path)


def _archive_files(args: argparse.Namespace) -> dict[str, Path]:
    """``key -> path`` of the files given by ``--target``, ``--mapping-key``,
    ``--gate-file`` and ``--file KEY=PATH``."""
    files = dict(args.file)
    for key, option in FILE_OPTIONS.items():
        given = getattr(args, option.removeprefix("--").replace("-", "_"))
        if given is not None:
            files[key] = given
    return files


def _archive_command(args: argparse.Namespace) -> int:
    path = build_archive(
        name=args.name,
        version=args.version,
        victim=args.victim,
        config=args.config,
        export_path=args.export_path,
        surrogate=args.surrogate,
        index_to_name=args.index_to_name,
        force=args.force,
        handler=args.handler,
        archive_name=args.archive_name,
        files=_archive_files(args),
    )
    print(f"wrote {path}")
    return 0


def _serve_command(args: argparse.Namespace) -> int:
    if args.workdir is None:
        args.workdir = DEFAULT_KSERVE_WORKDIR if args.runtime == "kserve" else DEFAULT_WORKDIR
    if args.stop:
        pids, kserve_pids = stop_server(args.workdir), stop_kserve(args.workdir)
        if kserve_pids:
            print(f"stopped the KServe model server ({len(kserve_pids)} processes)")
        if pids or not kserve_pids:
            print(f"stopped TorchServe ({len(pids)} processes)" if pids
                  else f"no server running from {args.workdir}")
        return 0
    if args.runtime == "kserve":
        return _serve_kserve(args)
    if args.free_ports:
        ports = Ports.free(args.host)
    else:
        ports = Ports(*(getattr(args, f"{field.name}_port") for field in fields(Ports)))
    server = start_server(
        model_store=args.model_store,
        models=args.models,
        workdir=args.workdir,
        ts_config=args.ts_config,
        ports=ports,
        host=args.host,
        timeout=args.timeout,
    )
    print(describe_server(server))
    return 0


def _serve_kserve(args: argparse.Namespace) -> int:
    specs = [spec.partition("=") for spec in parse_model_specs(args.model_store, args.models)]
    if len({name for name, _, _ in specs}) != len(specs):
        raise SystemExit("--runtime kserve serves one version per model name")
    port = None if args.free_ports else args.inference_port
    server = start_kserve({name: Path(args.model_store) / file for name, _, file in specs},
                          workdir=args.workdir, host=args.host, port=port,
                          timeout=args.timeout)
    print(describe_kserve(server))
    return 0


def describe_kserve(server: KServeServer) -> str:
    """Endpoints and models of a running KServe model server, for people."""
    return "\n".join([
        f"KServe model server is READY (pid {server.pid}), work dir {server.workdir}",
        f"  inference   {server.inference_url}   POST /v1/models/NAME:predict, "
        "/v2/models/NAME/infer",
        f"  metrics     {server.metrics_url}",
        f"  models      {'; '.join(f'{name} ({path})' for name, path in server.models.items())}",
        "  no authentication: keep it on loopback or behind an authenticating gateway",
        f"  log         {server.log_file}",
        f"Stop it with: grad2 serve --stop --workdir {server.workdir}",
    ])


def describe_server(server: TorchServeServer) -> str:
    """Endpoints, models and token file of a running server, for people."""
    versions = []
    for name in server.models:
        found = [str(v.get("modelVersion")) for v in server.model_versions(name)]
        versions.append(f"{name} ({', '.join(found)})")
    return "\n".join([
        f"TorchServe is READY (pid {server.pid}), work dir {server.workdir}",
        f"  inference   {server.inference_url}   POST /predictions/NAME[/VERSION], "
        "/v1/models/NAME:predict, /v2/models/NAME/infer",
        f"  management  {server.management_url}",
        f"  metrics     {server.metrics_url}",
        f"  gRPC        {server.grpc_inference_target} (inference), "
        f"{server.host}:{server.ports.grpc_management} (management)",
        f"  models      {'; '.join(versions)}",
        f"  tokens      {server.key_file}  (header 'Authorization: Bearer <inference key>')",
        f"  logs        {server.log_dir}",
        f"Stop it with: grad2 serve --stop --workdir {server.workdir}",
    ])
