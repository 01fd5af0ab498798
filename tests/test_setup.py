"""tools/ensure_torch.py: an index whose host does not answer is left out instead of retried for every package."""

import socket

from scale_fixtures import tool


def test_an_index_is_offered_only_when_its_host_answers(monkeypatch):
    ensure_torch = tool("ensure_torch")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert ensure_torch.reachable(f"http://127.0.0.1:{port}/whl/cpu")
    assert not ensure_torch.reachable(f"http://127.0.0.1:{port}/whl/cpu")  # closed now
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert ensure_torch.reachable(f"http://127.0.0.1:{port}/whl/cpu")  # only pip, through the proxy, can tell
