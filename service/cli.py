"""`cxr-embed serve` and `cxr-embed listen`, registered through the entry-point group `cxr_embed.commands`."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from cxr_embed.cli import add_backend_options
from cxr_embed.errors import ConfigError, CxrEmbedError

from .server import LOG_FORMATS


def register(sub) -> None:
    """Add this package's subcommands to the `cxr-embed` parser."""
    p = sub.add_parser("serve", help="run the HTTP service (FastAPI under uvicorn)")
    p.add_argument("--host", default=None, help="address to listen on (CXR_EMBED_HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (CXR_EMBED_PORT; default 8000)")
    p.add_argument("--model", default=None, help="model name or checkpoint (CXR_EMBED_MODEL; default: shipped model)")
    p.add_argument("--probes", default=None,
                   help="folder of saved probes (*.json) or one probe file (CXR_EMBED_PROBES); default: the shipped "
                        "example probe (NIH pneumonia) when the model is the shipped default; 'none': no probes")
    p.add_argument("--store", default=None, help="store searched by /search (CXR_EMBED_STORE)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (CXR_EMBED_DEVICE; default auto)")
    add_backend_options(p, default=None)  # None: CXR_EMBED_BACKEND / CXR_EMBED_PRECISION, else auto/f32
    p.add_argument("--image-check", default=None, choices=["auto", "always", "never"],
                   help="is-it-a-frontal-CXR check by the image: auto (default) when DICOM tags do not already say "
                        "CR/DX chest AP/PA, always, or never (tags only) (CXR_EMBED_IMAGE_CHECK)")
    p.add_argument("--log-level", default="info", help="log level (default %(default)s)")
    p.add_argument("--log-format", default=None, choices=LOG_FORMATS,
                   help="text, or JSON lines with request ids (CXR_EMBED_LOG_FORMAT; default text)")
    p.set_defaults(func=_cmd_serve)
    _add_listen(sub)


def _add_listen(sub) -> None:
    p = sub.add_parser("listen", help="run a DICOM Storage SCP (C-STORE, C-ECHO) that embeds CR/DX instances into a store")
    p.add_argument("--out", required=True, help="the HDF5 store to create or extend (ids: SOP Instance UIDs)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=11112, help="port (default %(default)s)")
    p.add_argument("--ae-title", default="CXREMBED", help="this SCP's AE title (default %(default)s)")
    p.add_argument("--require-called-aet", action="store_true", help="refuse associations addressed to another AE title")
    p.add_argument("--max-associations", type=int, default=8, help="associations at a time (default %(default)s)")
    p.add_argument("--max-pdu", type=int, default=4 * 2**20,
                   help="largest PDU accepted, in bytes (4096 to 64 MiB; default %(default)s: a radiograph arrives in "
                        "a few PDUs; senders may send smaller ones)")
    p.add_argument("--model", default=None, help="model name or checkpoint (CXR_EMBED_MODEL; default: shipped model)")
    p.add_argument("--probes", default=None, help="folder of saved probes (*.json) or one probe file (CXR_EMBED_PROBES)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (CXR_EMBED_DEVICE; default auto)")
    p.add_argument("--image-check", default=None, choices=["auto", "always", "never"],
                   help="is-it-a-frontal-CXR check by the image, as for serve (CXR_EMBED_IMAGE_CHECK; default auto)")
    add_backend_options(p, default=None)  # as for serve
    p.set_defaults(func=_cmd_listen)


def check_port_free(host: str, port: int) -> None:
    """Refuse a busy port before the model loads (a bind test, released at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise CxrEmbedError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; is another server running "
                                "there? Choose another with --port") from None


def check_probes_path(probes) -> None:
    """Refuse a --probes path that does not exist before the model loads (it was said after)."""
    if probes and not Path(probes).exists():
        raise ConfigError(f"--probes {probes}: no such file or folder (a folder of saved probes, *.json, or one "
                          "probe file; train one with `cxr-embed probe`)")


def serve(settings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the service until stopped; raises CxrEmbedError when the port is busy or loading fails."""
    from cxr_embed.process import configure_process

    from .app import create_app
    from .engine import Engine
    from .server import run

    check_port_free(host, port)
    configure_process(blas_threads=1)
    engine = Engine(settings)
    print(f"serving on http://{host}:{port} (docs at /docs); /ready answers 503 until the model is loaded", flush=True)
    run(create_app(settings, engine, exit_on_load_error=True), settings, host, port, log_level)
    if engine.load_error:
        raise CxrEmbedError(f"could not start: {engine.load_error}")


def default_probes(settings) -> str | None:
    """The shipped example probe when no probes were asked for and the model is the shipped default
    (the example sits on it); else None."""
    from cxr_embed.registry import SHIPPED_MODEL, default_model_name

    from probes.examples import example_probe_path

    model = settings.model or default_model_name()
    return str(example_probe_path()) if model == SHIPPED_MODEL else None


def _cmd_serve(args) -> int:
    from .settings import ServiceSettings

    settings = ServiceSettings.from_env(model=args.model, probes=args.probes, store=args.store, device=args.device,
                                        image_check=args.image_check, log_format=args.log_format,
                                        backend=args.backend, precision=args.precision)
    if settings.probes is None and not settings.no_probes:
        settings.probes = default_probes(settings)
        if settings.probes:
            print("serving the shipped example probe (NIH pneumonia, research use only); --probes DIR for your own, "
                  "--probes none for none", flush=True)
    check_probes_path(settings.probes)
    host = args.host or os.environ.get("CXR_EMBED_HOST", "127.0.0.1")
    raw_port = args.port or os.environ.get("CXR_EMBED_PORT", "8000")
    try:
        port = int(raw_port)
    except ValueError:
        raise ConfigError(f"CXR_EMBED_PORT={raw_port!r} is not a port number") from None
    serve(settings, host, port, args.log_level)
    return 0


def _cmd_listen(args) -> int:
    import logging

    from .listener import ListenerSettings, listener_service_settings, run_listener

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cxr_embed").setLevel(logging.INFO)  # counts and statuses
    # pynetdicom's INFO/DEBUG lines name UIDs and dump headers; pydicom logs decoder tracebacks for each
    # undecodable instance, which the listener already answers and records with a typed reason
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    service = listener_service_settings(model=args.model, probes=args.probes, device=args.device,
                                        image_check=args.image_check, backend=args.backend, precision=args.precision)
    check_probes_path(service.probes)
    settings = ListenerSettings(out=args.out, service=service, host=args.host, port=args.port, ae_title=args.ae_title,
                                require_called_aet=args.require_called_aet, max_associations=args.max_associations,
                                max_pdu=args.max_pdu)
    print(run_listener(settings).text(), flush=True)
    return 0
