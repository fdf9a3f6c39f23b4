"""Put the app on uvicorn: load the model (or start the Ray Serve replicas), bind, serve until SIGTERM.

On SIGTERM (or SIGINT) uvicorn stops accepting connections, lets the requests in flight finish (the batcher
keeps running until then), and only then runs the app's shutdown: the engine stops and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket

from vexport.serve.config import ServeOptions

log = logging.getLogger(__name__)


class Server:
    """``Server.prepare(model, options)`` loads and binds; ``.url`` is where it listens; ``.run()`` serves."""

    def __init__(self, app, sock: socket.socket, options: ServeOptions):
        self.app, self.sock, self.options = app, sock, options

    @classmethod
    def prepare(cls, model: str, options: ServeOptions) -> "Server":
        from vexport.serve import openrlhf
        from vexport.serve.app import create_app
        from vexport.serve.inputs import Encoder
        from vexport.serve.metrics import Metrics

        options.check()
        metrics = Metrics()
        if options.engine == "ray":
            from vexport.serve.ray_engine import RayEngine

            engine, tokenizer, config, options = RayEngine.deploy(model, options, metrics)
        else:
            engine, tokenizer, config, options = _local_engine(model, options, metrics)
        options = openrlhf.resolve(options, config)
        encoder = Encoder(tokenizer, config.vocab_size, options.max_length)
        app = create_app(engine, encoder, options, metrics)
        return cls(app, bind(options.host, options.port), options)

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def run(self) -> None:
        import uvicorn

        from vexport.serve.protocol import http_protocol

        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=None, http=http_protocol(self.options.half_close))
        # uvicorn drains on SIGTERM, then re-raises it to the handler it found: make that one return, so a
        # drained server exits 0 (SIGINT keeps Python's KeyboardInterrupt)
        previous = signal.signal(signal.SIGTERM, _drained)
        try:
            uvicorn.Server(config).run(sockets=[self.sock])
        finally:
            signal.signal(signal.SIGTERM, previous)



def _drained(signum, frame) -> None:
    log.info("stopped on SIGTERM after the requests in flight finished")


def _local_engine(model: str, options: ServeOptions, metrics):
    import torch

    from vexport.runtime import load
    from vexport.serve.engine import LocalEngine

    if options.threads:
        torch.set_num_threads(options.threads)
    loaded = load(model, device=options.device, threads=options.threads)
    config = loaded.config
    options = options.resolved(model, getattr(config, "max_position_embeddings", None))
    log.info("loaded %r: %s %s on %s", model, loaded.format, loaded.precision, loaded.device)
    return LocalEngine(loaded, options, metrics), loaded.tokenizer, config, options


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on HOST:PORT (port 0: any free one)."""
    from vexport.errors import VexportError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise VexportError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
