"""TLS (``rediss://``) against a private redis-server that listens only on a TLS port, with certificates made here."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentcomms import AgentMessage, BrokerConnectionError, ConfigError, MessageBroker, Settings
from agentcomms.transport import ConnectionSpec, LinkLost
from agentcomms.transport.link import open_link
from faultkit import RedisServer
from test_broker import message
from test_cli import Cli
from tlskit import Pair, Pki, TlsRedisServer, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def server(tmp_path: Path, pki: Pki) -> Iterator[TlsRedisServer]:
    """Clients need no certificate (``tls-auth-clients no``)."""
    with TlsRedisServer(tmp_path / "redis", pki) as instance:
        yield instance


@pytest.fixture
def mtls_server(tmp_path: Path, pki: Pki) -> Iterator[TlsRedisServer]:
    """Clients must present a certificate signed by the harness's CA (``tls-auth-clients yes``)."""
    with TlsRedisServer(tmp_path / "redis-mtls", pki, auth_clients=True) as instance:
        yield instance


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home)


def tls_settings(
    url: str, ca: Path | None, client: Pair | None = None, *, require_tls: bool = False, **extra: Any
) -> Settings:
    return Settings(
        redis_url=url,
        redis_ssl_ca_certs=ca,
        redis_ssl_certfile=client.cert if client else None,
        redis_ssl_keyfile=client.key if client else None,
        require_tls=require_tls,
        claim_idle=0.3,
        **extra,
    )


async def echo(msg: AgentMessage) -> dict[str, Any]:
    return {"echo": msg.payload.data}


async def connect_error(settings: Settings) -> str:
    """The message of the BrokerConnectionError that ``connect()`` raises."""
    broker = MessageBroker(settings=settings)
    with pytest.raises(BrokerConnectionError) as caught:
        await broker.connect()
    assert not broker.connected
    print(caught.value)
    return str(caught.value)


def tls_version(broker: MessageBroker) -> str | None:
    """The TLS version of the broker's pipelined connection (None: not TLS)."""
    link = broker.pipeliner.node_for_key("")._link
    assert link is not None and link._transport is not None
    ssl_object = link._transport.get_extra_info("ssl_object")
    return ssl_object.version() if ssl_object is not None else None


# -- working connections ---------------------------------------------------------------------


async def test_request_reply_and_subscription_over_tls(server: TlsRedisServer, pki: Pki) -> None:
    settings = tls_settings(server.url, pki.ca, require_tls=True)
    received: list[AgentMessage] = []
    one_way = asyncio.Event()

    async def handler(msg: AgentMessage) -> dict[str, Any] | None:
        if msg.payload.data.get("one_way"):
            received.append(msg)
            one_way.set()
            return None
        return await echo(msg)

    async with MessageBroker(settings=settings, client_name="agent") as agent_side:
        await agent_side.subscribe_to_agent("agent.tls.echo", handler)
        async with MessageBroker(settings=settings, client_name="caller") as caller:
            reply = await caller.request(message("agent.tls.echo", n=1), timeout=20)
            await caller.publish_message(message("agent.tls.echo", one_way=True))
            async with asyncio.timeout(20):
                await one_way.wait()
            version = tls_version(caller)
            assert caller.spec.address.startswith("rediss://127.0.0.1:")
    print(f"reply {reply.data} over {version}")
    assert reply.success and reply.data == {"echo": {"n": 1}}
    assert [m.payload.data for m in received] == [{"one_way": True}]
    assert version in ("TLSv1.2", "TLSv1.3")


async def test_localhost_matches_the_certificates_dns_name(server: TlsRedisServer, pki: Pki) -> None:
    url = f"rediss://localhost:{server.port}"
    async with MessageBroker(settings=tls_settings(url, pki.ca)) as broker:
        assert (await broker.health_check())["status"] == "healthy"


async def test_client_certificate_required_and_given(mtls_server: TlsRedisServer, pki: Pki) -> None:
    settings = tls_settings(mtls_server.url, pki.ca, pki.client)
    async with MessageBroker(settings=settings) as broker:
        await broker.subscribe_to_agent("agent.tls.mtls", echo)
        reply = await broker.request(message("agent.tls.mtls", n=2), timeout=20)
    assert reply.data == {"echo": {"n": 2}}


async def test_event_feed_over_tls(server: TlsRedisServer, pki: Pki) -> None:
    async with MessageBroker(settings=tls_settings(server.url, pki.ca)) as broker:
        feed = broker.events()
        assert isinstance(feed, AsyncGenerator)
        async with asyncio.timeout(20):
            assert (await anext(feed))["event"] == "subscribed"
            sent = message("agent.tls.feed")
            await broker.publish_message(sent)
            event = await anext(feed)
        await feed.aclose()
    assert event["event"] == "sent" and event["message_id"] == sent.message_id


async def test_requests_go_on_after_a_redis_restart_over_tls(mtls_server: TlsRedisServer, pki: Pki) -> None:
    settings = tls_settings(mtls_server.url, pki.ca, pki.client, reconnect_timeout=30)
    async with MessageBroker(settings=settings, client_name="agent") as agent_side:
        await agent_side.subscribe_to_agent("agent.tls.restart", echo)
        async with MessageBroker(settings=settings, client_name="caller") as caller:
            assert (await caller.request(message("agent.tls.restart", n=0), timeout=20)).data == {"echo": {"n": 0}}
            await asyncio.to_thread(mtls_server.stop)
            await asyncio.to_thread(mtls_server.start)
            replies = [await caller.request(message("agent.tls.restart", n=n), timeout=30) for n in range(1, 4)]
            reconnects = caller.stats.reconnects
            version = tls_version(caller)
    print(f"{reconnects} reconnect(s), then {version}")
    assert [r.data for r in replies] == [{"echo": {"n": n}} for n in range(1, 4)]
    assert reconnects >= 1 and version in ("TLSv1.2", "TLSv1.3")


# -- refused handshakes ----------------------------------------------------------------------


async def test_client_certificate_required_and_missing(mtls_server: TlsRedisServer, pki: Pki) -> None:
    error = await connect_error(tls_settings(mtls_server.url, pki.ca))
    # the server's alert, or (if our first write met the reset that follows it first) the closed connection
    assert "TLS" in error and "requires a client certificate" in error and "REDIS_SSL_CERTFILE" in error


async def test_a_client_certificate_of_another_ca_is_refused(mtls_server: TlsRedisServer, pki: Pki) -> None:
    error = await connect_error(tls_settings(mtls_server.url, pki.ca, pki.other_client))
    assert "TLS" in error and "refused this" in error and "client certificate" in error


async def test_an_untrusted_server_is_refused(server: TlsRedisServer, pki: Pki) -> None:
    error = await connect_error(tls_settings(server.url, pki.other_ca))
    assert "TLS" in error and "certificate verification" in error and "REDIS_SSL_CA_CERTS" in error


async def test_the_system_cas_do_not_trust_a_private_ca(server: TlsRedisServer) -> None:
    error = await connect_error(tls_settings(server.url, None))
    assert "TLS" in error and "certificate verification" in error


async def test_a_certificate_for_another_name_is_refused(tmp_path: Path, pki: Pki) -> None:
    with TlsRedisServer(tmp_path / "wrong-name", pki, server=pki.wrong_name) as wrong:
        by_ip = await connect_error(tls_settings(wrong.url, pki.ca))
        by_name = await connect_error(tls_settings(f"rediss://localhost:{wrong.port}", pki.ca))
    assert "certificate verification" in by_ip and "IP address mismatch" in by_ip and "'127.0.0.1'" in by_ip
    assert "certificate verification" in by_name and "Hostname mismatch" in by_name and "'localhost'" in by_name


async def test_an_expired_server_certificate_is_refused(tmp_path: Path, pki: Pki) -> None:
    with TlsRedisServer(tmp_path / "expired", pki, server=pki.expired) as expired:
        error = await connect_error(tls_settings(expired.url, pki.ca))
    assert "certificate verification" in error and "expired" in error


async def test_a_server_back_with_a_bad_certificate_fails_sends_like_any_outage(tmp_path: Path, pki: Pki) -> None:
    server = TlsRedisServer(tmp_path / "swap", pki).start()
    try:
        settings = tls_settings(server.url, pki.ca, reconnect_timeout=1)
        async with MessageBroker(settings=settings) as broker:
            assert (await broker.publish_message(message("agent.tls.swap", n=0))).entry_id
            await asyncio.to_thread(server.stop)
            server.server_pair = pki.wrong_name  # same port, a certificate for another name
            await asyncio.to_thread(server.start)
            with pytest.raises(BrokerConnectionError) as caught:
                await broker.publish_message(message("agent.tls.swap", n=1))
            print(caught.value)
            assert "Redis unavailable for 1s" in str(caught.value) and "IP address mismatch" in str(caught.value)
            await asyncio.to_thread(server.stop)
            server.server_pair = pki.server
            await asyncio.to_thread(server.start)
            assert (await broker.publish_message(message("agent.tls.swap", n=2))).entry_id  # good again: goes on
    finally:
        server.stop()


async def test_rediss_to_a_plaintext_port_says_it_is_not_a_tls_port(tmp_path: Path, pki: Pki) -> None:
    with RedisServer(tmp_path / "plain") as plain:
        spec = ConnectionSpec.from_url(f"rediss://127.0.0.1:{plain.port}", ssl_ca_certs=pki.ca, connect_timeout=0.5)
        with pytest.raises(LinkLost) as caught:
            await open_link(spec, name="test.plain")
    print(caught.value)
    # Redis waits for a newline in the ClientHello (no answer: timeout) or answers -ERR (not TLS)
    assert "TLS port?" in str(caught.value)


# -- configuration ---------------------------------------------------------------------------


def test_require_tls_refuses_a_plaintext_url_and_hides_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        ConnectionSpec.from_url("redis://:hunter2@127.0.0.1:6379/0", require_tls=True)
    print(caught.value)
    assert "AGENTCOMMS_REQUIRE_TLS" in str(caught.value) and "redis://:***@127.0.0.1:6379/0" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert ConnectionSpec.from_url("unix:///tmp/redis.sock", require_tls=True).path == "/tmp/redis.sock"
    assert ConnectionSpec.from_url("rediss://127.0.0.1:6380", require_tls=True).ssl_context is not None


async def test_require_tls_refuses_before_connecting() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", require_tls=True)
    with pytest.raises(ConfigError, match="AGENTCOMMS_REQUIRE_TLS"):
        await MessageBroker(settings=settings).connect()


def test_url_options_cannot_turn_verification_off() -> None:
    for query in ("ssl_cert_reqs=none", "ssl_check_hostname=false", "ssl_ca_certs=/tmp/ca.pem"):
        with pytest.raises(ConfigError) as caught:
            ConnectionSpec.from_url(f"rediss://:hunter2@127.0.0.1:6380/0?{query}")
        assert "not supported" in str(caught.value) and "always verified" in str(caught.value)
        assert "hunter2" not in str(caught.value)
    print(caught.value)


def test_the_context_verifies_the_server_and_its_name(pki: Pki) -> None:
    spec = ConnectionSpec.from_url("rediss://127.0.0.1:6380", ssl_ca_certs=pki.ca)
    assert spec.ssl_context is not None
    assert spec.ssl_context.verify_mode == ssl.CERT_REQUIRED and spec.ssl_context.check_hostname
    assert ConnectionSpec.from_url("redis://127.0.0.1:6379", ssl_ca_certs=pki.ca).ssl_context is None


def test_unusable_certificate_files_are_config_errors_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key_text = pki.client.key.read_text()
    loaded = serialization.load_pem_private_key(key_text.encode(), None)
    encrypted, traditional = tmp_path / "encrypted.key", tmp_path / "traditional.key"
    for path, form in (
        (encrypted, serialization.PrivateFormat.PKCS8),
        (traditional, serialization.PrivateFormat.TraditionalOpenSSL),
    ):
        path.write_bytes(
            loaded.private_bytes(serialization.Encoding.PEM, form, serialization.BestAvailableEncryption(b"secret"))
        )
    missing = tmp_path / "missing.pem"
    ca, cert, key = pki.ca, pki.client.cert, pki.client.key
    cases: list[tuple[Path, Path | None, Path | None, Path, str]] = [
        # (REDIS_SSL_CA_CERTS, REDIS_SSL_CERTFILE, REDIS_SSL_KEYFILE), the file named, what is said
        (missing, None, None, missing, "cannot read REDIS_SSL_CA_CERTS"),
        (key, None, None, key, "REDIS_SSL_CA_CERTS holds no PEM certificate"),
        (ca, cert, missing, missing, "cannot read REDIS_SSL_KEYFILE"),
        (ca, cert, pki.server.key, pki.server.key, "REDIS_SSL_KEYFILE is not the key of the certificate"),
        (ca, cert, encrypted, encrypted, "the private key is encrypted"),
        (ca, cert, traditional, traditional, "the private key is encrypted"),
        (ca, cert, None, cert, "REDIS_SSL_CERTFILE holds no private key: set REDIS_SSL_KEYFILE"),
        (ca, None, key, key, "REDIS_SSL_KEYFILE is set without REDIS_SSL_CERTFILE"),
        (ca, key, key, key, "REDIS_SSL_CERTFILE holds no PEM certificate"),
    ]
    for ca_certs, certfile, keyfile, path, expected in cases:
        with pytest.raises(ConfigError) as caught:
            ConnectionSpec.from_url(
                "rediss://127.0.0.1:6380", ssl_ca_certs=ca_certs, ssl_certfile=certfile, ssl_keyfile=keyfile
            )
        print(caught.value)
        assert caught.value.path == str(path) and str(path) in str(caught.value)
        assert expected in str(caught.value)
        assert "PRIVATE KEY" not in str(caught.value) and key_text.splitlines()[1] not in str(caught.value)


async def test_the_password_of_a_rediss_url_is_never_shown(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = TlsRedisServer(tmp_path / "pw", pki).start(wait=False, extra=["--requirepass", "hunter2"])
    try:
        url = f"rediss://:hunter2@127.0.0.1:{server.port}/0"
        async with MessageBroker(settings=tls_settings(url, pki.ca)) as broker:
            assert (await broker.health_check())["status"] == "healthy"
            shown = [broker.url, str(broker.spec), repr(broker.spec), repr(broker.settings)]
        untrusted = MessageBroker(settings=tls_settings(url, pki.other_ca))
        with pytest.raises(BrokerConnectionError) as caught:
            await untrusted.connect()
        shown += [str(caught.value), untrusted.url, caplog.text]
    finally:
        server.stop()
    print(shown[0], "|", shown[4])
    assert "rediss://:***@127.0.0.1" in shown[0] and "certificate verification" in shown[4]
    assert not [text for text in shown if "hunter2" in text]


# -- the command line ------------------------------------------------------------------------


async def test_cli_with_require_tls_and_a_plaintext_url_exits_2_with_one_line(cli: Cli) -> None:
    result = await cli("agents", redis_url="redis://:hunter2@127.0.0.1:1/0", env={"AGENTCOMMS_REQUIRE_TLS": "true"})
    print(result.err)
    assert result.code == 2
    [line] = result.err.strip().splitlines()
    assert "AGENTCOMMS_REQUIRE_TLS" in line and "rediss://" in line and "hunter2" not in line


async def test_cli_over_tls_from_the_environment(cli: Cli, mtls_server: TlsRedisServer, pki: Pki) -> None:
    env = {
        "AGENTCOMMS_REQUIRE_TLS": "1",
        "REDIS_SSL_CA_CERTS": str(pki.ca),
        "REDIS_SSL_CERTFILE": str(pki.client.cert),
        "REDIS_SSL_KEYFILE": str(pki.client.key),
    }
    result = await cli("agents", "--json", redis_url=mtls_server.url, env=env)
    assert result.code == 0, result.err
    assert result.out.strip() == "[]"
    without_certificate = {k: v for k, v in env.items() if k not in ("REDIS_SSL_CERTFILE", "REDIS_SSL_KEYFILE")}
    refused = await cli("agents", redis_url=mtls_server.url, env=without_certificate)
    print(refused.err)
    assert refused.code == 5
    [line] = refused.err.strip().splitlines()
    assert "TLS" in line and "client certificate" in line and "Traceback" not in refused.err
    unreadable = await cli("agents", redis_url=mtls_server.url, env={**env, "REDIS_SSL_KEYFILE": "/nonexistent.key"})
    print(unreadable.err)
    assert unreadable.code == 2
    [line] = unreadable.err.strip().splitlines()
    assert "/nonexistent.key" in line and "REDIS_SSL_KEYFILE" in line


def test_empty_certificate_variables_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_SSL_CA_CERTS", "REDIS_SSL_CERTFILE", "REDIS_SSL_KEYFILE"):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert (settings.redis_ssl_ca_certs, settings.redis_ssl_certfile, settings.redis_ssl_keyfile) == (None, None, None)
