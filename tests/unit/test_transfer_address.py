"""Where the servers' workers reach trainer rank 0 (rollout.server.transfer_address when unset): the
local address of the interface that routes to the servers, never a loopback address that a cluster
node's /etc/hosts gives its own name (127.0.1.1) while the servers are elsewhere."""

import logging
import socket

import pytest

from rollout import server
from rollout.server import transfer_address

pytestmark = pytest.mark.unit
REMOTE = "http://10.20.30.40:8000"  # an address literal: no name is resolved, no packet is sent


def test_a_configured_address_wins():
    assert transfer_address([REMOTE], "192.168.7.7") == "192.168.7.7"


def test_local_servers_meet_on_loopback():
    assert transfer_address(["http://127.0.0.1:8000", "http://localhost:8001/"]) == "127.0.0.1"


def test_the_address_is_the_one_that_routes_to_the_server():
    """A UDP socket `connect` picks the route and sends nothing; to a loopback server the route is
    loopback, found for real here without any network."""
    assert server.route_address("127.0.0.1", 8000) == "127.0.0.1"


def test_remote_servers_get_the_routing_interface_not_the_host_name_s_address(monkeypatch, caplog):
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")  # a cluster node's /etc/hosts
    routes = []
    monkeypatch.setattr(server, "route_address", lambda host, port: routes.append((host, port)) or "10.20.30.5",
                        raising=False)
    with caplog.at_level(logging.WARNING, logger="rollout.server"):
        assert transfer_address(["http://127.0.0.1:8001", REMOTE, "http://10.20.30.41:8000"]) == "10.20.30.5"
    assert routes == [("10.20.30.40", 8000)]  # the first server that is not on this machine
    assert not caplog.records


def test_a_loopback_choice_for_a_remote_server_is_a_warning(monkeypatch, caplog):
    def unroutable(host, port):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(server, "route_address", unroutable, raising=False)
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")  # the fallback, as before
    with caplog.at_level(logging.WARNING, logger="rollout.server"):
        assert transfer_address([REMOTE]) == "127.0.1.1"
    assert any("rollout.server.transfer_address" in r.getMessage() for r in caplog.records)
