"""The default price (issue 15, point 5): what this process may use of the machine (affinity, cgroup
limits from fake files), the CPU estimate from the price table, and the precedence --price-per-hour,
GPU table entry, CPU estimate. Pure Python, no model."""

from __future__ import annotations

import logging

import pytest

import thrifty.cost.prices as prices
from thrifty.config import EngineConfig
from thrifty.cost.prices import PRICES_ENV, builtin_prices, merge_prices, price_for_cpu, server_price
from thrifty.machine import GiB, MachineShare, cgroup_cpu_limit, cgroup_memory_limit_bytes, machine_share

C7A = builtin_prices().get("AWS c7a.xlarge")
C7I = builtin_prices().get("AWS c7i.xlarge")


@pytest.fixture(autouse=True)
def _builtin_table_only(monkeypatch):
    monkeypatch.delenv(PRICES_ENV, raising=False)


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---- machine share ---------------------------------------------------------------------------------

def fake_v2(tmp_path, cpu_max: str | None = None, memory_max: str | None = None, group: str = "/"):
    root, proc = tmp_path / "cgroup", tmp_path / "proc_self_cgroup"
    write(proc, f"0::{group}\n")
    d = root / group.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    if cpu_max is not None:
        write(d / "cpu.max", cpu_max + "\n")
    if memory_max is not None:
        write(d / "memory.max", memory_max + "\n")
    meminfo = tmp_path / "meminfo"
    write(meminfo, "MemTotal:       16777216 kB\nMemFree:         1000 kB\n")  # 16 GiB
    return dict(root=root, proc_cgroup=proc, meminfo=meminfo)


def test_v2_quota_caps_affinity_and_memory_limit_caps_memtotal(tmp_path):
    files = fake_v2(tmp_path, cpu_max="150000 100000", memory_max=str(4 * GiB))
    share = machine_share(affinity=8, **files)
    assert share.vcpus == 1.5 and share.memory_gib == 4.0
    assert "1.5 of" in share.describe() and "4.0 GiB" in share.describe()


def test_v2_without_limits_is_affinity_and_memtotal(tmp_path):
    files = fake_v2(tmp_path, cpu_max="max 100000", memory_max="max")
    share = machine_share(affinity=3, **files)
    assert share.vcpus == 3.0 and share.memory_gib == 16.0


def test_quota_above_affinity_does_not_raise_it(tmp_path):
    assert machine_share(affinity=2, **fake_v2(tmp_path, cpu_max="400000 100000")).vcpus == 2.0


def test_v2_parent_limit_binds_a_nested_group(tmp_path):
    files = fake_v2(tmp_path, cpu_max="max 100000", group="/kubepods/pod1/ctr")
    write(files["root"] / "kubepods" / "pod1" / "cpu.max", "200000 100000\n")
    write(files["root"] / "kubepods" / "pod1" / "memory.max", str(2 * GiB))
    assert cgroup_cpu_limit(files["root"], files["proc_cgroup"]) == 2.0
    assert cgroup_memory_limit_bytes(files["root"], files["proc_cgroup"]) == 2 * GiB


def test_namespaced_group_falls_back_to_the_mount_root(tmp_path):
    # /proc/self/cgroup names a path the container cannot see: the root holds its limits.
    files = fake_v2(tmp_path, cpu_max="50000 100000")
    write(files["proc_cgroup"], "0::/not/visible/here\n")
    assert cgroup_cpu_limit(files["root"], files["proc_cgroup"]) == 0.5


def test_v1_quota_and_limit(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "proc_self_cgroup"
    write(proc, "4:memory:/job\n3:cpu,cpuacct:/job\n")
    write(root / "cpu" / "job" / "cpu.cfs_quota_us", "300000")
    write(root / "cpu" / "job" / "cpu.cfs_period_us", "100000")
    write(root / "cpu" / "cpu.cfs_quota_us", "-1")  # the root: no quota
    write(root / "cpu" / "cpu.cfs_period_us", "100000")
    write(root / "memory" / "job" / "memory.limit_in_bytes", str(3 * GiB))
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712")  # v1's "no limit"
    assert cgroup_cpu_limit(root, proc) == 3.0
    assert cgroup_memory_limit_bytes(root, proc) == 3 * GiB


def test_no_cgroup_files_means_no_limits(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "missing") is None
    assert cgroup_memory_limit_bytes(tmp_path / "none", tmp_path / "missing") is None
    share = machine_share(affinity=4, root=tmp_path / "none", proc_cgroup=tmp_path / "missing",
                          meminfo=tmp_path / "missing")
    assert share.vcpus == 4.0 and share.memory_gib is None


def test_this_machine_share_is_sane():
    share = machine_share()
    assert 0 < share.vcpus <= share.host_cpus and (share.memory_gib is None or share.memory_gib > 0)


# ---- the CPU estimate ------------------------------------------------------------------------------

@pytest.mark.parametrize("vendor, entry", [("AuthenticAMD", C7A), ("GenuineIntel", C7I)])
def test_cpu_estimate_takes_the_vendor_entry_scaled_per_vcpu(vendor, entry):
    est = price_for_cpu(vendor, 2, 23.5)
    assert est.source == "estimate" and est.entry == entry.name
    assert est.price_per_hour_usd == pytest.approx(entry.price_per_hour_usd * 2 / 4)
    assert entry.vcpus == 4
    assert "scaled to 2 vCPU" in est.detail and "23.5 GiB" in est.detail and entry.date in est.detail
    assert price_for_cpu(vendor, 16).price_per_hour_usd == pytest.approx(entry.price_per_hour_usd * 4)


def test_unknown_vendor_takes_the_cheapest_cpu_per_vcpu():
    est = price_for_cpu("", 4)  # ARM's /proc/cpuinfo has no vendor_id
    cheapest = min((C7A, C7I), key=lambda e: e.price_per_hour_usd / e.vcpus)
    assert est.entry == cheapest.name and est.price_per_hour_usd == pytest.approx(cheapest.price_per_hour_usd)
    assert "not in the table" in est.detail


def test_the_nearest_size_of_the_vendor_wins():
    big = {"name": "AWS c7a.8xlarge", "kind": "cpu", "price_per_hour_usd": 1.5, "vcpus": 32,
           "cpu_vendor": "AuthenticAMD", "source": "test", "date": "2025-06"}
    table = merge_prices(builtin_prices(), [big], "test.json")
    assert price_for_cpu("AuthenticAMD", 24, table=table).entry == "AWS c7a.8xlarge"
    assert price_for_cpu("AuthenticAMD", 24, table=table).price_per_hour_usd == pytest.approx(1.5 * 24 / 32)
    assert price_for_cpu("AuthenticAMD", 2, table=table).entry == C7A.name


def test_no_cpu_entry_with_vcpus_gives_none_and_bad_vcpus_are_errors():
    table = merge_prices(builtin_prices(), [{"name": C7A.name, "vcpus": None}, {"name": C7I.name, "vcpus": None}],
                         "test.json")
    assert price_for_cpu("AuthenticAMD", 2, table=table) is None
    assert server_price(None, table=table).source == "off"
    with pytest.raises(ValueError, match="vcpus"):
        price_for_cpu("AuthenticAMD", 0)
    with pytest.raises(ValueError, match="vcpus"):
        merge_prices(builtin_prices(), [{"name": C7A.name, "vcpus": 2.5}], "test.json")


# ---- precedence ------------------------------------------------------------------------------------

def test_the_flag_wins_and_zero_turns_cost_off():
    flag = server_price(0.75, "NVIDIA H200")
    assert (flag.price_per_hour_usd, flag.source) == (0.75, "flag")
    off = server_price(0, "NVIDIA H200")
    assert (off.price_per_hour_usd, off.source) == (0.0, "off") and "costs are 0" in off.describe()
    with pytest.raises(ValueError, match="price_per_hour must be >= 0"):
        server_price(-1)


def test_a_gpu_takes_its_table_entry_and_an_unknown_gpu_none():
    h100 = server_price(None, "NVIDIA H100 80GB HBM3")
    assert (h100.price_per_hour_usd, h100.source, h100.entry) == (2.99, "table", "NVIDIA H100 SXM")
    unknown = server_price(None, "NVIDIA GeForce RTX 4090")
    assert (unknown.price_per_hour_usd, unknown.source) == (0.0, "off") and "RTX 4090" in unknown.detail


def test_a_cpu_server_gets_an_estimate_for_its_share(monkeypatch):
    monkeypatch.setattr(prices, "machine_share", lambda: MachineShare(vcpus=2.0, memory_gib=7.5, host_cpus=64))
    monkeypatch.setattr(prices, "cpu_vendor", lambda: "GenuineIntel")
    est = server_price(None)
    assert est.source == "estimate" and est.price_per_hour_usd == pytest.approx(C7I.price_per_hour_usd / 2)
    assert "$0.08925/h" in est.describe() and "0 turns cost off" in est.describe()
    ray_replica = server_price(None, vcpus=1.0)  # a Ray replica's num_cpus
    assert ray_replica.price_per_hour_usd == pytest.approx(C7I.price_per_hour_usd / 4)


def test_resolve_price_on_cuda_asks_torch_for_the_gpu_name(monkeypatch, caplog):
    import torch

    from thrifty.entrypoints.openai.api_server import resolve_price

    config = EngineConfig(device="cpu")
    monkeypatch.setattr(EngineConfig, "resolve_device", lambda self: "cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    with caplog.at_level(logging.INFO, logger="thrifty.server"):
        choice = resolve_price(None, config)
    assert (choice.source, choice.entry, choice.price_per_hour_usd) == ("table", "NVIDIA L40S", 1.861)
    assert "price: $1.861/h, table: NVIDIA L40S" in caplog.text
    assert resolve_price(0.5, config).source == "flag"  # the flag: torch is not asked
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="thrifty.server"):
        assert resolve_price(None, config).price_per_hour_usd == 0.0
        resolve_price(0, config)
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]  # only the unexpected 0 warns


def test_resolve_price_on_cpu_logs_the_estimate(monkeypatch, caplog):
    from thrifty.entrypoints.openai.api_server import resolve_price

    with caplog.at_level(logging.INFO, logger="thrifty.server"):
        choice = resolve_price(None, EngineConfig(device="cpu"))
    assert choice.source == "estimate" and choice.price_per_hour_usd > 0
    assert "estimate:" in caplog.text and "--price-per-hour sets it" in caplog.text


# ---- a real server ---------------------------------------------------------------------------------

def _price_info(url: str) -> tuple[dict[str, str], float]:
    import httpx2 as httpx
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text)}
    info = families["thrifty:price_info"].samples[0]
    price = families["thrifty:price_per_hour_usd"].samples[0]
    assert set(price.labels) == {"model_name"}  # the existing series keeps its label set
    return info.labels, price.value


@pytest.mark.slow
@pytest.mark.parametrize("flags, source", [((), "estimate"), (("--price-per-hour", "0"), "off")])
def test_server_shows_cost_by_default_and_zero_turns_it_off(flags, source):
    import openai
    from conftest import Server

    srv = Server("--kv-cache-memory", "0.1", "--max-model-len", "512", *flags)
    try:
        labels, price = _price_info(srv.url)
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    finally:
        assert srv.stop() == 0
    assert labels["source"] == source
    if source == "estimate":
        # The very first request is priced, at the estimate the log line and the label name.
        assert r.usage.cost_usd > 0 and price > 0
        assert labels["entry"] in ("AWS c7a.xlarge", "AWS c7i.xlarge") and "scaled to" in labels["detail"]
    else:
        assert r.usage.cost_usd == 0 and price == 0 and labels["detail"] == "--price-per-hour 0"
