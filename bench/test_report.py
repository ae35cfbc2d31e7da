"""bench/report.py: the README's tables come from results files, the same way every time.

    .venv/bin/python -m pytest bench/test_report.py

No VM, no clock: synthetic results files of every benchmark, in the layout the benchmarks
write (tables.SCHEMA), rendered into a README with generated sections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import report
import tables

MACHINE = {"date_utc": "2026-11-27T12:00:00Z", "host": "h", "cpu": "Test CPU", "cores": 2,
           "accel": "tcg", "accel_hardware": False, "accel_reason": "no kvm",
           "qemu": "QEMU emulator version 7.2.0", "python": "3.11.2",
           "loadavg_1m_at_start": 0.5, "loadavg_1m_at_end": 0.7, "code": "abc123"}


def summ(x: float, n: int = 3) -> dict[str, Any]:
    return {"n": n, "median": x, "p99": x * 1.5, "max": x * 1.5, "mean": x * 1.1}


def run_results() -> dict[str, Any]:
    modes = ["cli restore", "cli restore, no network", "restore floor", "cli boot",
             "cli boot, no network", "boot floor", "cli first use"]
    floor_of = {m: ("restore floor" if "restore" in m else "boot floor") for m in modes}
    times = dict(zip(modes, (0.6, 0.5, 0.05, 3.0, 2.8, 2.5, 5.0), strict=True))
    per_image = {
        "summary": {m: summ(t) for m, t in times.items()},
        "ratio_median_vs_floor": {m: t / times[floor_of[m]] for m, t in times.items()},
        "cold_over_restore": {"cli boot / cli restore": 5.0,
                              "cli boot, no network / cli restore, no network": 5.6},
    }
    return {"modes": modes, "floor_of": floor_of, "boot_target_ratio": 1.3, "reps": 2,
            "busybox": per_image, "python": per_image,
            "python_startup": summ(0.02, 5), "cli_help": summ(0.04, 5),
            "phases_busybox_phases-child": {"import": summ(0.04, 1),
                                            "boot to HELLO": summ(2.4, 1)},
            "phases_busybox_restore-phases-child": {"VM.start total": summ(0.15, 1),
                                                    "  restore to HELLO": summ(0.1, 1)},
            "rootfs_build": {"busybox": {"seconds": 0.05, "squashfs_bytes": 1_400_000,
                                         "layers_bytes": 1_000_000}}}


def pull_results() -> dict[str, Any]:
    img = {"image_blob_bytes": 1_100_000, "ours": summ(0.2), "skopeo": summ(0.25),
           "ratio_median": 0.8, "target_ratio": 1.0,
           "first_run": {"run_cold": summ(4.0, 1), "split_pull": summ(0.2, 1)}}
    # a run before the python floor was measured, and one with it
    return {"reps": 2, "run_reps": 1,
            "images": {"busybox": img, "python": {**img, "floor": summ(0.1)}}}


def exec_results() -> dict[str, Any]:
    side = {"exec_true": summ(0.01), "stream_mb_s_median": 50.0}
    return {"exec_calls": 30, "stream_bytes": 10_000_000, "stream_reps": 2, "vm": side,
            "host_baseline": {"exec_true": summ(0.001), "stream_mb_s_median": 500.0},
            "ratio_exec_p50": 10.0, "ratio_stream_mb_s": 0.1, "target_exec_p50_seconds": 0.01,
            "guest_diagnostics": {"agent_ping_rtt_median": 0.0002,
                                  "spawn_to_started_median": 0.005,
                                  "started_to_exit_median": 0.003,
                                  "exec_abs_true_median": 0.007,
                                  "guest_fork_exec_true": 0.005,
                                  "guest_dd_to_devnull_mb_s": 400.0,
                                  "guest_dd_pipe_cat_mb_s": 60.0},
            "cli_half": {"status": "measured", "reps": 10, "cli exec true": summ(0.08),
                         "python -c pass": summ(0.01), "supermachine --help": summ(0.03)}}


def snapshot_results() -> dict[str, Any]:
    api = {k: summ(0.1) for k in (
        "restore_to_first_exec", "restore_only", "first_exec_after_restore",
        "restore_to_first_exec_no_network", "restore_only_no_network", "restore_floor",
        "restore_floor_to_running", "first_exec_after_restore_unprefetched",
        "cold_boot_to_first_exec")}
    api.update(ratio_restore_only_no_network_over_floor=2.0, ratio_restore_only_over_floor=2.5,
               ratio_cold_over_restore=5.5)
    return {"memory": "256M", "api": api, "first_use": summ(4.0, 1),
            "cli_run_echo": summ(0.5), "pool_acquire_to_exec": summ(0.02),
            "idle_python_vm": {"sample": 3, "qemu_rss_median": 100 << 20,
                               "qemu_pss_median": 70 << 20,
                               "guest_ram_resident_median": 36 << 20,
                               "guest_ram_shared_fraction_median": 0.6,
                               "host_process_rss_per_vm": 1 << 17},
            "density": {"started": 12, "cap": 12, "alive_at_end": 12, "first_failure": None,
                        "mem_available_with_all_running": 18 << 30}}


def net_results() -> dict[str, Any]:
    def server(rps: float, mb: float, vm: bool) -> dict[str, Any]:
        http = {"rps": rps, "latency": summ(1 / rps)}
        out = {"keepalive": http, "new_conn": http, "bulk_in_mb_s_median": mb,
               "bulk_out_mb_s_median": mb}
        if vm:
            out.update(vm_start_seconds=0.2, restored=True, qemu_rss_kib=150_000,
                       passt_rss_kib=26_000)
        return out

    return {"params": {"conns": 8, "requests": 400, "bytes": 20_000_000, "rounds": 2},
            "runs": {"host": server(30000.0, 3000.0, False), "passt": server(1800.0, 16.0, True),
                     "slirp": server(1600.0, 39.0, True)}}


def peers_results() -> dict[str, Any]:
    s = {"supermachine": summ(0.6), "supermachine, no network": summ(0.5),
         "runc, no network": summ(0.2), "runc": summ(0.5), "gVisor, no network": summ(0.35)}
    return {"reps": 3, "baseline": "runc, no network", "summary": s,
            "ratio_median_vs_baseline": {k: v["median"] / 0.2 for k, v in s.items()},
            "unavailable": {"gVisor": "exit 126: cannot run with network enabled"},
            "versions": {"podman": "podman version 4.3.1"},
            "setup": {"runsc_flags": ["network=none"]}}


def oci_results() -> dict[str, Any]:
    s = {"supermachine run": summ(0.6), "podman + supermachine-runtime": summ(0.9),
         "podman + runc": summ(0.7)}
    return {"reps": 3, "baseline": "supermachine run", "summary": s, "target_ratio": 1.3,
            "ratio_median_vs_baseline": {k: v["median"] / 0.6 for k, v in s.items()},
            "versions": {"podman": "podman version 4.3.1"}}


def cli_results() -> dict[str, Any]:
    names = ["python -c pass", "supermachine --version", "supermachine ps",
             "supermachine --help"]
    s = {n: summ(t) for n, t in zip(names, (0.016, 0.025, 0.035, 0.06), strict=True)}
    return {"reps": 10, "baseline": "python -c pass", "commands": names, "summary": s,
            "ratio_median_vs_baseline": {n: v["median"] / 0.016 for n, v in s.items()},
            "target_ratio": 2.5, "targets": names[1:3]}


def previous_results() -> dict[str, Any]:
    s = {"this checkout": summ(0.55), "earlier commit": summ(0.6)}
    return {"reps": 4, "image": "busybox", "against": "b568066",
            "earlier_commit": "b568066abcde", "summary": s,
            "ratio_current_over_earlier": 0.55 / 0.6, "target_ratio": 1.0}


def kernel_results() -> dict[str, Any]:
    def one(cold: float, first: float, blocks: float, pss: float, touched: int) -> dict:
        return {"cold_run_no_snapshot": summ(cold), "restore_to_first_exec": summ(first + 0.1),
                "restore_only": summ(0.1), "first_exec": summ(first),
                "first_exec_blocks": summ(blocks), "idle_restored_pss": summ(pss),
                "snapshot_memory_allocated": touched}
    return {"reps": 3, "memory": "256M", "target_cold_ratio": 0.45,
            "kernels": {"debian": one(3.4, 0.2, 15000, 70e6, 65 << 20),
                        "supermachine": one(1.5, 0.12, 12000, 60e6, 34 << 20)},
            "ratio_cold_supermachine_over_debian": 1.5 / 3.4,
            "build": {"wall_s": 672, "jobs": 2, "disk_peak_bytes": 1 << 30,
                      "vmlinux_bytes": 21 << 20}}


def volumes_results() -> dict[str, Any]:
    io = {place: {"write_mbps": summ(100), "read_mbps": summ(200),
                  "small_files_per_s": summ(1000), "tar_x_s": summ(1.5)}
          for place in ("bind mount (9p)", "named volume (9p)", "sized volume (ext4 disk)",
                        "VM root overlay", "VM tmpfs", "host")}
    restore = {"no_mounts": summ(0.29), "two_host_directories": summ(0.32),
               "one_sized_volume": summ(0.31)}
    return {"reps": 3, "seq_mib": 64, "small_files": 10000, "tree": "/usr/lib/python3.11",
            "io": io, "restore_to_first_exec": restore, "ratio_two_mounts_over_none": 0.32 / 0.29,
            "target_ratio": 1.15, "disk_size": 512 << 20,
            "close": {"no_mounts": summ(0.01), "two_host_directories": summ(0.01),
                      "one_sized_volume": summ(0.05)}}


def jail_results() -> dict[str, Any]:
    paths = {"restore_to_first_exec": {"off": summ(0.30), "required": summ(0.305)},
             "cold_run_no_snapshot": {"off": summ(1.6), "required": summ(1.61)}}
    return {"reps": 20, "cold_reps": 5, "root": True, "paths": paths, "bare_jail": summ(0.004),
            "target_ms": 10.0, "target_ratio": 1.05,
            "within_target": {"restore_to_first_exec": True, "cold_run_no_snapshot": True}}


def hostile_results() -> dict[str, Any]:
    attack = {"latency": summ(0.03), "ratio_p50": 1.5, "hostile_peak_rss": 300 << 20,
              "drained_bytes": 0, "hostile_cpu_s": 7.9}
    return {"seconds": 8.0, "target_ratio": 2.0, "hostile_memory_mib": 256,
            "quiet": summ(0.02), "attacks": {"fork bomb": attack,
                                             "stdout flood": {**attack,
                                                              "drained_bytes": 1 << 30}}}


def service_results() -> dict[str, Any]:
    both = {"service": summ(0.2), "service, stdin a terminal": summ(0.09),
            "in-process": summ(0.55)}
    api = {side: {"total": summ(t), "acquire": summ(t / 3), "first_exec": summ(t * 2 / 3)}
           for side, t in (("service", 0.03), ("in-process", 0.02))}
    rtt = {"service": summ(0.025), "in-process": summ(0.018)}

    def tp(rate: float) -> dict[str, Any]:
        return {"per_minute_median": rate, "cycles": int(rate / 4), "cycle": summ(0.8),
                "hits": int(rate / 4), "misses": 1}

    return {"image": "busybox fixture", "threads": 4, "window_s": 15.0, "rounds": 1,
            "pool_sizes": {"cli_and_api": 2, "throughput": 8},
            "targets": {"cli_service_p50_s": 0.1, "api_acquire_to_first_exec_p50_s": 0.02,
                        "exec_rtt_ratio_p50": 1.5},
            "cli": {"reps": 5, "modes": list(both), "summary": both, "pool_hits": 10,
                    "ratio_over_in_process": {k: v["median"] / 0.55 for k, v in both.items()}},
            "api_acquire": {"reps": 10, "summary": api, "ratio_service_over_in_process": 1.5},
            "exec_rtt": {"calls": 50, "summary": rtt,
                         "ratio_service_over_in_process": 0.025 / 0.018},
            "throughput": {"service": tp(240.0), "in-process": tp(300.0),
                           "ratio_service_over_in_process": 0.8},
            "service_process": {"serve_rss_idle": 60 << 20, "serve_rss_pool2": 70 << 20,
                                "serve_rss_pool8": 75 << 20,
                                "serve_rss_after_throughput": 80 << 20,
                                "serve_rss_end_no_pools": 78 << 20, "vm_pss_pool2": 90 << 20,
                                "vm_pss_pool8": 300 << 20, "idle_startup_s": 0.5,
                                "pool2_ready_after_service_json_s": 1.5, "pool8_fill_s": 6.0,
                                "idle_stop_s": 0.2, "stop_s": None, "vm_processes_at_stop": 4,
                                "leftover_processes": ["passt (pid 4242)"],
                                "leftover_vm_dirs": [], "exit_codes": [0, 0]}}


FACTORIES = {"bench_run": run_results, "bench_pull": pull_results, "bench_exec": exec_results,
             "bench_snapshot": snapshot_results, "bench_net": net_results,
             "bench_peers": peers_results, "bench_cli": cli_results,
             "bench_previous": previous_results, "bench_kernel": kernel_results,
             "bench_volumes": volumes_results, "bench_jail": jail_results,
             "bench_hostile": hostile_results, "bench_oci": oci_results,
             "bench_service": service_results}

README = """# Benchmarks

Hand-written text stays as it is.

{sections}
Trailing text.
"""


def write(results: Path, bench: str, stamp: str, *, quick: bool, schema: int = tables.SCHEMA,
          **extra: Any) -> Path:
    data = {**FACTORIES[bench](), "machine": {**MACHINE, **extra}, "bench": bench,
            "quick": quick, "schema": schema}
    path = results / f"{bench}-{stamp}.json"
    path.write_text(json.dumps(data))
    return path


def readme_with_sections() -> str:
    sections = "".join(f"<!-- bench:{b} -->\nstale\n<!-- /bench:{b} -->\n\n"
                       for b in tables.TABLES)
    return README.format(sections=sections)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    for bench in tables.TABLES:
        write(d, bench, "20261127T120000Z", quick=False)
    return d


def test_factories_cover_every_benchmark() -> None:
    assert set(FACTORIES) == set(tables.TABLES)


def test_regenerate_is_deterministic_and_idempotent(results: Path, tmp_path: Path) -> None:
    readme = readme_with_sections()
    first = report.regenerate(readme, results, tmp_path)
    assert report.regenerate(readme, results, tmp_path) == first
    assert report.regenerate(first, results, tmp_path) == first
    assert "stale" not in first
    for bench in tables.TABLES:
        assert f"From `results/{bench}-20261127T120000Z.json`" in first


def test_text_outside_sections_is_kept(results: Path, tmp_path: Path) -> None:
    out = report.regenerate(readme_with_sections(), results, tmp_path)
    assert out.startswith("# Benchmarks\n\nHand-written text stays as it is.\n")
    assert out.endswith("Trailing text.\n")


def test_machine_facts_in_every_section(results: Path, tmp_path: Path) -> None:
    out = report.regenerate(readme_with_sections(), results, tmp_path)
    for fact in ("2026-11-27T12:00:00Z", "tcg (emulated)", "QEMU emulator version 7.2.0",
                 "Test CPU", "load 0.5 at start, 0.7 at end", "code abc123"):
        assert out.count(fact) == len(tables.TABLES), fact


def test_full_run_preferred_over_newer_quick_run(results: Path, tmp_path: Path) -> None:
    write(results, "bench_run", "20261128T000000Z", quick=True)
    chosen = report.choose(results, "bench_run")
    assert chosen is not None and chosen.path.name == "bench_run-20261127T120000Z.json"
    write(results, "bench_run", "20261128T010000Z", quick=False)
    chosen = report.choose(results, "bench_run")
    assert chosen is not None and chosen.path.name == "bench_run-20261128T010000Z.json"


def test_quick_run_used_and_labelled_when_alone(tmp_path: Path) -> None:
    d = tmp_path / "results"
    d.mkdir()
    write(d, "bench_peers", "20261127T120000Z", quick=True)
    out = report.regenerate(readme_with_sections(), d, tmp_path)
    assert "Quick smoke run" in out
    assert "*No results file of bench_run" in out


def test_other_layouts_and_latest_copies_are_ignored(tmp_path: Path) -> None:
    d = tmp_path / "results"
    d.mkdir()
    write(d, "bench_exec", "20261127T120000Z", quick=False)
    write(d, "bench_exec", "20261129T120000Z", quick=False, schema=tables.SCHEMA - 1)
    (d / "bench_exec-latest.json").write_text("{}")
    (d / "bench_exec-20261130T120000Z.json").write_text("not json")
    chosen = report.choose(d, "bench_exec")
    assert chosen is not None and chosen.path.name == "bench_exec-20261127T120000Z.json"


def test_unavailable_peer_is_reported_not_faked(results: Path, tmp_path: Path) -> None:
    out = report.regenerate(readme_with_sections(), results, tmp_path)
    assert "| gVisor | unavailable (below) |  | - |" in out
    assert "gVisor unavailable: exit 126: cannot run with network enabled" in out


def test_check_mode(results: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(readme_with_sections())
    argv = ["--readme", str(readme), "--results", str(results)]
    assert report.main([*argv, "--check"]) == 1
    assert report.main(argv) == 0
    assert report.main([*argv, "--check"]) == 0


def test_text_and_markdown_render_the_same_cells(results: Path) -> None:
    data = json.loads((results / "bench_peers-20261127T120000Z.json").read_text())
    t = tables.bench_peers(data)
    text, md = tables.render_text(t), tables.render_markdown(t)
    for row in t[0].rows:
        for cell in row:
            assert cell in text and cell in md


def test_repo_readme_has_a_section_per_benchmark() -> None:
    text = (Path(__file__).parent / "README.md").read_text()
    names = {m.group("name") for m in report.SECTION_RE.finditer(text)}
    assert names == set(tables.TABLES)


def test_pull_shows_the_python_floor_where_it_was_measured() -> None:
    rows = tables.bench_pull({**pull_results(), "machine": MACHINE})[0].rows
    floors = [r for r in rows if r[2].startswith("python floor")]
    assert [r[0] for r in floors] == ["python"]  # the older-style busybox entry has none
    assert floors[0][6] == "0.40x"  # its median over skopeo's
