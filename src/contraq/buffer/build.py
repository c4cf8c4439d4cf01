"""A replay buffer from the ``buffer`` config group (``configs/buffer/*.yaml``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from contraq import redis_server
from contraq.buffer.errors import BufferUnavailableError
from contraq.buffer.memory import MemoryBuffer
from contraq.buffer.policy import NEAR_DUP_RATIO, ReplayBuffer
from contraq.buffer.redis_backend import RedisBuffer


def build_buffer(cfg: Mapping[str, Any] | Any) -> ReplayBuffer:
    """Build a buffer from ``{backend: memory|redis, max_size, ...}`` (dict or DictConfig).

    Reads only the keys the buffer uses (how often and how to replay is the training loop's
    ``train.replay``). For ``redis``:
    ``password: null`` falls back to env ``CONTRAQ_REDIS_PASSWORD``; with ``autostart: true``
    and a local host, a redis-server is started in ``data_dir`` if none answers (see
    :func:`contraq.redis_server.ensure_running`).
    """
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise ValueError(f"buffer config must be a mapping, got {type(cfg).__name__}")
    backend = cfg.get("backend", "memory")
    max_size = cfg.get("max_size", 50)
    ratio = cfg.get("near_dup_ratio", NEAR_DUP_RATIO)
    if backend == "memory":
        return MemoryBuffer(max_size=max_size, near_dup_ratio=ratio)
    if backend != "redis":
        raise ValueError(f"buffer.backend must be 'memory' or 'redis', got {backend!r}")

    password = cfg.get("password") or os.environ.get(redis_server.PASSWORD_ENV) or None
    host = cfg.get("host", "127.0.0.1")
    port = int(cfg.get("port", 6399))
    if cfg.get("autostart", False):
        data_dir = cfg.get("data_dir") or redis_server.DEFAULT_DATA_DIR
        try:
            redis_server.ensure_running(host, port, data_dir, password)
        except redis_server.RedisServerError as e:
            raise BufferUnavailableError(str(e)) from None
    return RedisBuffer(
        host=host,
        port=port,
        db=int(cfg.get("db", 0)),
        password=password,
        username=cfg.get("username"),
        ssl=bool(cfg.get("ssl", False)),
        ssl_ca_certs=cfg.get("ssl_ca_certs"),
        ssl_certfile=cfg.get("ssl_certfile"),
        ssl_keyfile=cfg.get("ssl_keyfile"),
        namespace=cfg.get("namespace") or "contraq:default",
        max_size=max_size,
        socket_timeout=float(cfg.get("socket_timeout", 5.0)),
        retries=int(cfg.get("retries", 5)),
        backoff=float(cfg.get("backoff", 0.2)),
        near_dup_ratio=ratio,
    )
