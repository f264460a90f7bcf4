"""Ray (started the way the launcher starts it) and the S3 fixture listen on loopback only."""

import psutil
import pytest

pytestmark = pytest.mark.integration


def _listening(pids):
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append(c.laddr.ip)
    return out


def test_ray_and_moto_bind_loopback(ray_cluster, s3_server):
    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    addrs = _listening(pids)
    assert len(addrs) >= 3, addrs  # gcs, raylet, workers, moto
    for ip in addrs:
        assert ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), f"listening on {ip}"
    assert ray_cluster.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
