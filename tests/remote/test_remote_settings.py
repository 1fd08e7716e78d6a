"""Settings of the remote tier against real servers: the config's password over the URL's, an ACL user
with only the commands the tier needs, no password in any log line, and settings that cannot work refused
as configuration errors before anything is dialed."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from remote_blocks import block_key, random_block

from kvtier.config import RemoteConfig
from kvtier.errors import ConfigError
from kvtier.layout import KVLayout
from kvtier.tiers.redis_client import redact
from kvtier.tiers.remote import RemoteTier
from kvtier.tiers.servers import LocalServers

if TYPE_CHECKING:
    from conftest import RemoteConfigFor

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=4)  # 512 B
PASSWORD = "pw-in-the-config-7f3a"
URL_PASSWORD = "pw-in-the-url-93c1"


def key(i: int) -> bytes:
    return block_key(i, "settings")


def payload(i: int) -> torch.Tensor:
    return random_block(i, LAYOUT.block_bytes)


def round_trip(tier: RemoteTier, i: int) -> None:
    assert tier.up
    assert tier.offer(key(i), payload(i))
    tier.flush()
    dst = torch.zeros(LAYOUT.block_bytes, dtype=torch.uint8)
    assert tier.submit_read(key(i), dst).result(10) and torch.equal(dst, payload(i))


def test_the_config_password_overrides_the_urls_and_no_log_line_shows_either(
        fresh_single: Callable[..., LocalServers], config_for: RemoteConfigFor,
        caplog: pytest.LogCaptureFixture) -> None:
    servers = fresh_single(args=("--requirepass", PASSWORD))
    with_url_password = (f"redis://:{URL_PASSWORD}@127.0.0.1:{servers.ports[0]}",)
    caplog.set_level(logging.DEBUG, logger="kvtier")
    tier = RemoteTier(config_for(servers, urls=with_url_password, password=PASSWORD), LAYOUT)
    try:
        round_trip(tier, 0)
    finally:
        tier.close()
    right_url = (f"redis://:{PASSWORD}@127.0.0.1:{servers.ports[0]}",)
    tier = RemoteTier(config_for(servers, urls=right_url), LAYOUT)
    try:
        round_trip(tier, 1)
    finally:
        tier.close()
    assert "remote tier up: connected to redis://:***@127.0.0.1" in caplog.text
    assert PASSWORD not in caplog.text and URL_PASSWORD not in caplog.text
    assert redact(right_url[0]) == f"redis://:***@127.0.0.1:{servers.ports[0]}"
    assert redact("rediss://user:p%40ss@host:1/2") == "rediss://user:***@host:1/2"
    assert PASSWORD not in repr(RemoteConfig(urls=("redis://x",), password=PASSWORD, auth_secret=PASSWORD * 2))


def test_an_acl_user_with_only_the_tiers_commands_is_enough(fresh_single: Callable[..., LocalServers],
                                                            config_for: RemoteConfigFor) -> None:
    servers = fresh_single()
    config = config_for(servers, username="kvtier", password=PASSWORD)
    with servers.client() as admin:
        admin.execute_command("ACL", "SETUSER", "kvtier", "on", f">{PASSWORD}", f"~{config.key_prefix}:*",
                              "+getrange", "+set", "+exists", "+del", "+ping")  # no INFO: the tier does without
    tier = RemoteTier(config, LAYOUT)
    try:
        round_trip(tier, 2)
        time.sleep(1.2)  # past one watch of the server (INFO refused: no news, no fault)
        assert tier.up and tier.stats(0).detail["faults"] == 0
    finally:
        tier.close()
    wrong = RemoteTier(config_for(servers, username="kvtier", password="not-the-password"), LAYOUT)
    try:
        assert not wrong.up and wrong.locate([key(2)]) == [False]
    finally:
        wrong.close()


def test_the_daemon_start_line_shows_no_password(fresh_single: Callable[..., LocalServers]) -> None:
    servers = fresh_single(args=("--requirepass", URL_PASSWORD))
    workdir = tempfile.mkdtemp(prefix="kvs", dir="/tmp")
    url = f"redis://:{URL_PASSWORD}@127.0.0.1:{servers.ports[0]}"
    command = [sys.executable, "-m", "kvtier.daemon", "--log-level", "INFO", "--set", f"remote.urls={url}",
               "--set", f"remote.key_prefix=s{os.getpid()}", "serve", "--socket", f"{workdir}/d.sock", "--pool",
               "256KiB", "--no-disk", "--metrics-port", "0", "--layout",
               "num_layers=2,num_kv_heads=2,head_dim=8,dtype=float16,block_tokens=4"]
    log_path = Path(workdir) / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "daemon ready" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        text = log_path.read_text()
        assert "remote tier up" in text and "starting:" in text and "***" in text
        assert URL_PASSWORD not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


def test_settings_that_cannot_work_are_configuration_errors(tmp_path: Path) -> None:
    for bad in ({"urls": ("unix:///tmp/redis.sock",), "mode": "cluster"},
                {"urls": ("unix:///tmp/redis.sock",), "tls": True},
                {"urls": ("redis://x",), "auth_secret": "short"},
                {"urls": ("redis://x",), "hash_key_names": True}):
        with pytest.raises(ConfigError):
            RemoteConfig(**bad)  # type: ignore[arg-type]
    for url in (f"http://user:{PASSWORD}@host", f"user:{PASSWORD}@host:6379"):
        with pytest.raises(ConfigError) as raised:
            RemoteConfig(urls=(url,))
        assert PASSWORD not in str(raised.value)
    missing = str(tmp_path / "no-such-ca.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    for config in (RemoteConfig(urls=("rediss://127.0.0.1:1",), tls_ca_file=missing),
                   RemoteConfig(urls=("redis://127.0.0.1:1",), tls=True, tls_ca_file=str(garbage)),
                   RemoteConfig(urls=("redis://127.0.0.1:1",), mode="cluster", tls=True, tls_cert_file=missing)):
        started = time.monotonic()
        with pytest.raises(ConfigError, match="cannot be loaded"):
            RemoteTier(config, LAYOUT)
        assert time.monotonic() - started < 1  # refused, not dialed and retried


def test_a_unix_socket_url_with_its_password_in_the_config(fresh_single: Callable[..., LocalServers],
                                                          config_for: RemoteConfigFor, tmp_path: Path) -> None:
    path = str(tmp_path / "redis.sock")
    servers = fresh_single(args=("--unixsocket", path, "--unixsocketperm", "700", "--requirepass", PASSWORD))
    tier = RemoteTier(config_for(servers, urls=(f"unix://{path}",), password=PASSWORD), LAYOUT)
    try:
        round_trip(tier, 3)
    finally:
        tier.close()
