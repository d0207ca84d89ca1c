"""Offline, a hub dataset or model fails (or loads from the cache) at once, not after half a minute of retries."""

import time

import pytest


@pytest.fixture
def unreachable_hub(monkeypatch):
    """No HF_*_OFFLINE in the environment and a hub address nothing answers on (this machine, port 443)."""
    import datasets.config as datasets_config
    import huggingface_hub.constants as hub_constants

    from clipguard import hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "")  # registered for restoring; go_offline may set them
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", False)
    hub.ensure_reachable_or_offline.cache_clear()
    yield hub_constants
    hub.ensure_reachable_or_offline.cache_clear()


def test_an_unreachable_hub_switches_this_process_offline(unreachable_hub):
    from clipguard import hub

    t0 = time.perf_counter()
    assert hub.ensure_reachable_or_offline() is False
    assert time.perf_counter() - t0 < hub.PROBE_TIMEOUT_S + 1
    assert unreachable_hub.HF_HUB_OFFLINE is True  # what huggingface_hub reads at call time


def test_asked_offline_means_no_probe(monkeypatch):
    from clipguard import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: pytest.fail("probed although offline"))
    hub.ensure_reachable_or_offline.cache_clear()
    assert hub.ensure_reachable_or_offline() is False
    hub.ensure_reachable_or_offline.cache_clear()


def test_a_catalogue_set_not_cached_fails_fast_and_names_the_local_routes(unreachable_hub, cli):
    t0 = time.perf_counter()
    code, _, err = cli("eval", "--dataset", "cifar10", "--limit", "5", "--device", "cpu")
    took = time.perf_counter() - t0
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "wds_vtab-cifar10" in err and "$CLIPGUARD_DATA" in err
    assert took < 10, took  # it took 29 s of retries (22 printed lines) before
