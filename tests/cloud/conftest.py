"""Shared serving fixtures: a real uvicorn server on loopback in a thread, a small served method."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
import torch
import uvicorn

from stablesynth.cloud.limits import GuardedConfig, ServeLimits
from stablesynth.cloud.server import CloudModel
from stablesynth.methods.base import METHODS
from stablesynth.methods.config import MethodConfig

K = 13
TOKEN = "s3cret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real uvicorn server on 127.0.0.1 in a background thread, with the service's connection limits."""

    def __init__(self, app: Any, limits: ServeLimits | None = None, **config: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(GuardedConfig(app, limits=limits, host="127.0.0.1", port=self.port,
                                                   log_level="error", lifespan="auto", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_method(generator: str = "film", seed: int = 0, name: str = "stablesynth") -> Any:
    torch.manual_seed(seed)
    method = METHODS.get(name)(MethodConfig(generator=generator), K).eval()
    with torch.no_grad():
        # An untrained film generator ignores the driver; random modulation makes Θ_d depend on the upload.
        for p in method.generator.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return method


@pytest.fixture(scope="session")
def live_server() -> type[Server]:
    """``with live_server(app) as srv: ... srv.url``: a real server on loopback."""
    return Server


@pytest.fixture(scope="session")
def method_factory() -> Any:
    """``method_factory(generator="film", seed=0, name="stablesynth")``: a small untrained method with K=13."""
    return make_method


@pytest.fixture(scope="module")
def cloud() -> CloudModel:
    cfg = MethodConfig(generator="film").to_dict()
    return CloudModel(make_method(), "easyvqa", "7", K, "stablesynth", cfg)
