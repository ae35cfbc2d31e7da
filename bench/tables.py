"""The benchmarks' tables, built from a results file's JSON alone.

One function per benchmark turns its results (the dict it writes to bench/results/) into
tables. The benchmark prints them as text when it finishes, and bench/report.py renders the
same tables as Markdown into bench/README.md, so a published number is always one a results
file holds. Pure code: no I/O, no clock, no imports of the package (the report runs without
a VM, and its output must be the same every time for the same files).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Version of the results files' layout. The report ignores files of another version (a
#: table function cannot read a layout it was not written for); bump it whenever a
#: benchmark's JSON changes shape.
SCHEMA = 2


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def fmt_s(seconds: float) -> str:
    """Milliseconds below a second (three decimals below one: loopback latencies), else
    seconds."""
    if seconds < 0.001:
        return f"{seconds * 1000:.3f} ms"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# ---------------------------------------------------------------------------- rendering


def render_text(tables: Sequence[Table]) -> str:
    out = []
    for t in tables:
        cells = [[str(c) for c in row] for row in t.rows]
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
                  for i, h in enumerate(t.headers)]
        out.append(f"\n{t.title}")
        out.append("  ".join(h.ljust(w) for h, w in zip(t.headers, widths, strict=True)))
        out.append("  ".join("-" * w for w in widths))
        out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                for row in cells]
        out += t.notes
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    # Leading spaces mark sub-rows in text tables; Markdown would drop them.
    stripped = text.lstrip(" ")
    indent = "· " * ((len(text) - len(stripped)) // 2)
    return (indent + stripped).replace("|", "\\|")


def render_markdown(tables: Sequence[Table]) -> str:
    out = []
    for t in tables:
        out.append(f"**{t.title}**")
        out.append("")
        out.append("| " + " | ".join(_md_cell(h) for h in t.headers) + " |")
        out.append("|" + "|".join("---" for _ in t.headers) + "|")
        out += ["| " + " | ".join(_md_cell(str(c)) for c in row) + " |" for row in t.rows]
        if t.notes:
            out.append("")
            out += [note.strip() + "  " if i < len(t.notes) - 1 else note.strip()
                    for i, note in enumerate(t.notes)]
        out.append("")
    return "\n".join(out)


def machine_line(results: dict[str, Any]) -> str:
    """Where and when a results file was measured, in one line."""
    m = results["machine"]
    accel = m["accel"] + (" (hardware)" if m.get("accel_hardware") else " (emulated)")
    load = f"load {m.get('loadavg_1m_at_start')}"
    if "loadavg_1m_at_end" in m:
        load += f" at start, {m['loadavg_1m_at_end']} at end"
    mode = "quick smoke run" if results.get("quick") else "full run"
    return (f"{mode}, {m['date_utc']}; accelerator {accel}; {m['qemu']}; {m['cpu']}, "
            f"{m['cores']} cores; {load}; code {m.get('code', 'unknown')}")


# ---------------------------------------------------------------------------- benchmarks


def bench_run(r: dict[str, Any]) -> list[Table]:
    images = [k for k in ("busybox", "python") if k in r]
    target = r["boot_target_ratio"]
    rows, cold = [], []
    for name in images:
        res = r[name]
        s, ratios = res["summary"], res["ratio_median_vs_floor"]
        for m in r["modes"]:
            floor = r["floor_of"][m]
            ok = ""
            if m.startswith("cli boot"):
                ok = "yes" if ratios[m] <= target else "NO"
            # Three decimals: the target column judges the exact ratio, and 1.30x beside
            # "NO" would read as a contradiction.
            rows.append([name, m, fmt_s(s[m]["median"]), fmt_s(s[m]["p99"]),
                         "" if m == floor else floor, f"{ratios[m]:.3f}x", ok])
        cold += [[name, k, f"{v:.1f}x"] for k, v in res["cold_over_restore"].items()]
    out = [
        Table(f"`run IMAGE true`, whole process wall time ({r['reps']} interleaved reps, "
              f"accel {r['machine']['accel']})",
              ["image", "mode", "p50", "p99", "compared with", "/ floor (p50)",
               f"boot <= {target}x"], rows,
              ["restore floor: bare QEMU restoring the snapshot `cli restore, no network` "
               "restores (same command line), Popen to RESUME, kill, reap.",
               "boot floor: bare QEMU, our command line minus the agent channel, /init a "
               "marker that powers off.",
               "cli first use: `run IMAGE true` in a fresh, empty home each rep (rootfs "
               "build + boot + bake + restore)."]),
        Table("cold / restore (p50 over p50, same run)", ["image", "ratio", "value"], cold),
    ]
    for key, label, whole, floor in (
            ("phases_busybox_phases-child", "boot path, no snapshot, no network",
             "cli boot, no network", "boot floor"),
            ("phases_busybox_restore-phases-child", "restore path", "cli restore",
             "restore floor")):
        if key not in r or "busybox" not in r:
            continue
        prow = [["python -c pass (venv)", fmt_s(r["python_startup"]["median"]),
                 str(r["python_startup"]["n"])],
                ["supermachine --help", fmt_s(r["cli_help"]["median"]),
                 str(r["cli_help"]["n"])]]
        accounted = r["python_startup"]["median"]
        for k, v in r[key].items():
            if not k.startswith("  "):  # indented rows split the row above them
                accounted += v["median"]
            prow.append([k, fmt_s(v["median"]), str(v["n"])])
        prow.append(["sum (python start + phases)", fmt_s(accounted), ""])
        for k in (whole, floor):
            prow.append([f"{k} (from above)", fmt_s(r["busybox"]["summary"][k]["median"]),
                         str(r["busybox"]["summary"][k]["n"])])
        out.append(Table(f"phases of a busybox run, {label} (medians; a fresh process each)",
                         ["phase", "median", "n"], prow))
    if "rootfs_build" in r:
        out.append(Table("rootfs build in a fresh store (1 rep each)",
                         ["image", "build", "squashfs size", "layers (compressed)"],
                         [[k, fmt_s(v["seconds"]), f"{v['squashfs_bytes'] / 1e6:.1f} MB",
                           f"{v['layers_bytes'] / 1e6:.1f} MB"]
                          for k, v in r["rootfs_build"].items()]))
    return out


def bench_pull(r: dict[str, Any]) -> list[Table]:
    pulls, runs = [], []
    labels = {
        "run_cold": "run REF true, empty store (pull+rootfs+boot+snapshot bake+restore)",
        "split_pull": "  split: supermachine pull",
        "split_run_after_pull": "  split: then run REF true (rootfs+boot+bake+restore)",
        "split_run_cached": "  then run REF true again (snapshot restore)"}
    for name, res in r["images"].items():
        mb = res["image_blob_bytes"] / 1e6
        ours, sk, ratio = res["ours"], res["skopeo"], res["ratio_median"]
        pulls += [
            [name, f"{mb:.1f} MB", "supermachine pull", fmt_s(ours["median"]),
             fmt_s(ours["p99"]), f"{mb / ours['median']:.0f}", fmt_x(ratio),
             f"<= {res['target_ratio']:.1f}x: " + ("yes" if ratio <= res["target_ratio"]
                                                   else "NO")],
            [name, f"{mb:.1f} MB", "skopeo copy -> oci:", fmt_s(sk["median"]),
             fmt_s(sk["p99"]), f"{mb / sk['median']:.0f}", fmt_x(1.0), ""]]
        if "floor" in res:  # runs before the floor was measured have none
            fl = res["floor"]
            pulls.append([name, f"{mb:.1f} MB", "python floor (pull_floor.py)",
                          fmt_s(fl["median"]), fmt_s(fl["p99"]), f"{mb / fl['median']:.0f}",
                          fmt_x(fl["median"] / sk["median"]), "reported"])
        runs += [[name, labels.get(k, k), fmt_s(v["median"]), fmt_s(v["max"]), str(v["n"])]
                 for k, v in res["first_run"].items()]
    return [
        Table("pull from a loopback registry into a cold store (reps: " + ", ".join(
            f"{name} {res.get('reps', r['reps'])}" for name, res in r["images"].items()) +
              "; the order of the pullers rotating, after an untimed warm-up of each)",
              ["image", "size", "puller", "p50", "p99", "MB/s (p50)", "/ skopeo (p50)",
               "target"], pulls),
        Table(f"time to first run of a freshly pulled image (accel {r['machine']['accel']}, "
              "a fresh home each rep)", ["image", "step", "median", "max", "n"], runs),
    ]


def bench_exec(r: dict[str, Any]) -> list[Table]:
    vm, host = r["vm"], r["host_baseline"]
    mb = r["stream_bytes"] // 1_000_000
    out = [Table(
        f"exec into one running busybox VM vs sm-init as a host process ({r['exec_calls']} "
        f"calls each, interleaved; accel {r['machine']['accel']})",
        ["measure", "VM", "host baseline", "VM / baseline"],
        [["exec true p50", fmt_s(vm["exec_true"]["median"]),
          fmt_s(host["exec_true"]["median"]), f"{r['ratio_exec_p50']:.1f}x"],
         ["exec true p99", fmt_s(vm["exec_true"]["p99"]), fmt_s(host["exec_true"]["p99"]),
          f"{vm['exec_true']['p99'] / host['exec_true']['p99']:.1f}x"],
         [f"stdout {mb} MB (median of {r['stream_reps']})",
          f"{vm['stream_mb_s_median']:.1f} MB/s", f"{host['stream_mb_s_median']:.1f} MB/s",
          fmt_x(r["ratio_stream_mb_s"])]],
        [f"exec p50 target <= {fmt_s(r['target_exec_p50_seconds'])}: "
         f"{'met' if vm['exec_true']['median'] <= r['target_exec_p50_seconds'] else 'NOT met'}"
         ])]
    d = r["guest_diagnostics"]
    out.append(Table("inside the VM (diagnostics, medians)", ["measure", "value"], [
        ["agent PING round trip (50)", fmt_s(d["agent_ping_rtt_median"])],
        ["spawn(['true']) to STARTED (fork, execve done; 30)",
         fmt_s(d["spawn_to_started_median"])],
        ["STARTED to exit status (30)", fmt_s(d["started_to_exit_median"])],
        ["vm.exec(['/bin/true']) (no PATH search, 50)", fmt_s(d["exec_abs_true_median"])],
        ["guest sh loop of /bin/true, per run (busybox ash may skip the exec)",
         fmt_s(d["guest_fork_exec_true"])],
        ["guest dd to /dev/null", f"{d['guest_dd_to_devnull_mb_s']:.1f} MB/s"],
        ["guest dd | cat > /dev/null (a pipe inside the guest)",
         f"{d['guest_dd_pipe_cat_mb_s']:.1f} MB/s"]]))
    cli = r["cli_half"]
    if cli.get("status") == "measured":
        out.append(Table(
            f"CLI: whole processes against a detached busybox VM ({cli['reps']} interleaved "
            "reps)", ["command", "p50", "p99"],
            [[k, fmt_s(cli[k]["median"]), fmt_s(cli[k]["p99"])]
             for k in ("cli exec true", "python -c pass", "supermachine --help")]))
    else:
        out.append(Table("CLI half", ["status"], [[cli.get("status", "missing")]]))
    return out


def bench_snapshot(r: dict[str, Any]) -> list[Table]:
    api = r["api"]

    def row(label: str, s: dict[str, Any], ratio: str = "") -> list[str]:
        return [label, str(s["n"]), fmt_s(s["median"]), fmt_s(s["p99"]), ratio]

    floor = api["restore_floor"]["median"]
    out = [
        Table(f"restore (busybox, API, {r['memory']} guest), interleaved; compared with bare "
              "QEMU restoring the same snapshot",
              ["measure", "n", "p50", "p99", "/ restore floor (p50)"], [
                  row("restore -> first exec result", api["restore_to_first_exec"]),
                  row("  of which restore (start())", api["restore_only"],
                      fmt_x(api["ratio_restore_only_over_floor"])),
                  row("  of which first exec", api["first_exec_after_restore"]),
                  row("restore -> first exec result, no network",
                      api["restore_to_first_exec_no_network"]),
                  row("  of which restore (start()), no network",
                      api["restore_only_no_network"],
                      fmt_x(api["ratio_restore_only_no_network_over_floor"])),
                  row("restore floor (bare QEMU, Popen to RESUME, kill, reap)",
                      api["restore_floor"], fmt_x(1.0)),
                  row("  of which to RESUME", api["restore_floor_to_running"],
                      fmt_x(api["restore_floor_to_running"]["median"] / floor)),
                  row("first exec, snapshot without prefetch",
                      api["first_exec_after_restore_unprefetched"]),
                  row("CLI run IMAGE echo x", r["cli_run_echo"]),
                  row("pool acquire -> exec (warm)", r["pool_acquire_to_exec"]),
              ],
              ["The restore floor restores the `network=\"none\"` VMs' snapshot; the default "
               "VMs' ratio also counts their network (passt)."]),
        Table("cold boot and first use (busybox, API)", ["measure", "n", "p50", "p99", "ratio"], [
            row("cold boot -> first exec result", api["cold_boot_to_first_exec"]),
            row("first use: start() in a fresh, empty home (rootfs + boot + bake + restore)",
                r["first_use"]),
            ["cold / restore (first exec result, p50 over p50)", "", "",
             "", f"{api['ratio_cold_over_restore']:.1f}x"]]),
    ]
    idle = r["idle_python_vm"]
    out.append(Table(f"idle restored python VMs (n={idle['sample']}, medians)",
                     ["measure", "value"], [
                         ["QEMU RSS", mib(idle["qemu_rss_median"])],
                         ["QEMU PSS", mib(idle["qemu_pss_median"])],
                         ["guest RAM resident in QEMU", mib(idle["guest_ram_resident_median"])],
                         ["  of it shared (not copied on write)",
                          f"{idle['guest_ram_shared_fraction_median']:.0%}"],
                         ["host process RSS per VM", mib(idle["host_process_rss_per_vm"])]]))
    d = r["density"]
    out.append(Table("density: idle python VMs started one after another",
                     ["started", "cap", "answering at the end", "MemAvailable with all",
                      "first failure"],
                     [[str(d["started"]), str(d["cap"]), str(d["alive_at_end"]),
                       mib(d["mem_available_with_all_running"]),
                       str(d["first_failure"] or "none")]]))
    return out


def bench_net(r: dict[str, Any]) -> list[Table]:
    p, runs = r["params"], r["runs"]
    base = runs["host"]
    rows = []
    for name, x in runs.items():
        ka, nc = x["keepalive"], x["new_conn"]
        rows.append([
            name, f"{ka['rps']:.0f}", fmt_s(ka["latency"]["median"]),
            fmt_s(ka["latency"]["p99"]), f"{nc['rps']:.0f}", fmt_s(nc["latency"]["p99"]),
            f"{x['bulk_in_mb_s_median']:.1f}", f"{x['bulk_out_mb_s_median']:.1f}",
            f"{ka['rps'] / base['keepalive']['rps']:.3f}",
            f"{x['bulk_in_mb_s_median'] / base['bulk_in_mb_s_median']:.3f}",
            f"{x['bulk_out_mb_s_median'] / base['bulk_out_mb_s_median']:.3f}"])
    return [
        Table(f"published port vs the same server on the host ({p['conns']} connections, "
              f"{p['requests']} requests, {p['bytes'] // 1_000_000} MB bulk, {p['rounds']} "
              f"interleaved rounds; accel {r['machine']['accel']})",
              ["server", "req/s", "p50", "p99", "new-conn req/s", "new-conn p99", "in MB/s",
               "out MB/s", "req/s ratio", "in ratio", "out ratio"], rows,
              ["req/s and MB/s: medians over rounds; latencies: percentiles over all "
               "requests."]),
        Table("VM costs (one start each)",
              ["backend", "VM start", "restored", "QEMU RSS", "passt RSS"],
              [[n, fmt_s(x["vm_start_seconds"]), str(x["restored"]),
                f"{(x['qemu_rss_kib'] or 0) // 1024} MiB",
                f"{x['passt_rss_kib'] // 1024} MiB" if x.get("passt_rss_kib") else "-"]
               for n, x in runs.items() if n != "host"]),
    ]


PEER_ORDER = ("supermachine, no network", "supermachine", "gVisor, no network", "gVisor",
              "runc, no network", "runc")


def bench_peers(r: dict[str, Any]) -> list[Table]:
    s, ratios = r["summary"], r["ratio_median_vs_baseline"]
    rows = []
    names = [n for n in PEER_ORDER if n in s or n in r["unavailable"]]
    names += [n for n in (*s, *r["unavailable"]) if n not in names]
    for name in names:
        if name in s:
            rows.append([name, fmt_s(s[name]["median"]), fmt_s(s[name]["p99"]),
                         fmt_x(ratios[name]) if name in ratios else "-"])
        else:
            rows.append([name, "unavailable (below)", "", "-"])
    notes = [f"{name} unavailable: {why}" for name, why in sorted(r["unavailable"].items())]
    v = r.get("versions", {})
    notes += [f"{k}: {v[k]}" for k in sorted(v)]
    if "runsc_flags" in r.get("setup", {}):
        notes.append("runsc flags: " + " ".join(f"--{f}" for f in r["setup"]["runsc_flags"]))
    return [Table(f"`run IMAGE echo x` beside podman + runc and podman + gVisor (busybox, "
                  f"{r['reps']} interleaved reps; accel {r['machine']['accel']})",
                  ["command", "p50", "p99", f"/ {r['baseline']} (p50)"], rows, notes)]


def bench_cli(r: dict[str, Any]) -> list[Table]:
    s, ratios, target = r["summary"], r["ratio_median_vs_baseline"], r["target_ratio"]
    rows = []
    for name in r["commands"]:
        ok = ("yes" if ratios[name] <= target else "NO") if name in r["targets"] else ""
        rows.append([name, fmt_s(s[name]["median"]), fmt_s(s[name]["p99"]),
                     fmt_x(ratios[name]), ok])
    return [Table(f"the command line's fixed costs, whole process wall time ({r['reps']} reps, "
                  "the order rotating; `ps` in an empty home)",
                  ["command", "p50", "p99", f"/ {r['baseline']} (p50)",
                   f"<= {target}x"], rows)]


def bench_previous(r: dict[str, Any]) -> list[Table]:
    s, ratio, target = r["summary"], r["ratio_current_over_earlier"], r["target_ratio"]
    rows = [[name, fmt_s(v["median"]), fmt_s(v["p99"])] for name, v in s.items()]
    return [Table(f"`run {r['image']} true`, restore path, this checkout against "
                  f"{r['earlier_commit']} ({r['reps']} reps, alternating)",
                  ["code", "p50", "p99"], rows,
                  [f"this checkout / earlier (p50): {fmt_x(ratio)} "
                   f"({'meets' if ratio <= target else 'misses'} <= {target}x)"])]


def bench_kernel(r: dict[str, Any]) -> list[Table]:
    k = r["kernels"]
    names = ("debian", "supermachine")

    def row(label: str, key: str, fmt=fmt_s) -> list[str]:
        cells = [fmt(k[n][key]["median"]) for n in names]
        cells += [fmt(k[n][key]["p99"]) for n in names]
        q = k["supermachine"][key]["median"] / k["debian"][key]["median"]
        return [label, *cells, fmt_x(q)]

    def count(v: float) -> str:
        return f"{v:,.0f}"

    b = r["build"]
    return [
        Table(f"guest kernels, busybox, {r['memory']} guest, n={r['reps']} each, interleaved "
              f"(target cold ratio <= {r['target_cold_ratio']:g}x)",
              ["measure", "debian p50", "supermachine p50", "debian p99", "supermachine p99",
               "supermachine / debian (p50)"], [
                  row("CLI run --no-snapshot IMAGE true (cold boot)", "cold_run_no_snapshot"),
                  row("restore -> first exec result (API, no network)",
                      "restore_to_first_exec"),
                  row("  of which restore (start())", "restore_only"),
                  row("  of which first exec", "first_exec"),
                  row("TCG blocks translated by the first exec", "first_exec_blocks", count),
                  row("PSS of an idle restored VM's QEMU", "idle_restored_pss", mib),
              ]),
        Table("guest RAM touched by boot and bake (allocated in the snapshot memory file), and "
              "the install-time build", ["measure", "value"], [
                  ["debian", mib(k["debian"]["snapshot_memory_allocated"])],
                  ["supermachine", mib(k["supermachine"]["snapshot_memory_allocated"])],
                  ["build wall time (extract, config, make vmlinux)",
                   f"{b['wall_s']:.0f} s with {b['jobs']} jobs"],
                  ["disk used at peak by the build", mib(b["disk_peak_bytes"])],
                  ["vmlinux kept", mib(b["vmlinux_bytes"])]]),
    ]


def bench_volumes(r: dict[str, Any]) -> list[Table]:
    io = r["io"]

    def rate(v: float) -> str:
        return f"{v:,.0f}"

    rows = []
    for place, m in io.items():
        rows.append([place, f"{m['write_mbps']['median']:.1f}", f"{m['read_mbps']['median']:.1f}",
                     rate(m["small_files_per_s"]["median"]), fmt_s(m["tar_x_s"]["median"])])
    rs = r["restore_to_first_exec"]
    return [
        Table(f"file I/O, busybox, medians of {r['reps']} (sequential {r['seq_mib']} MiB; "
              f"{r['small_files']:,} small files created and listed; tar x of {r['tree']})",
              ["where", "write MB/s", "read MB/s", "small files/s", "tar x"], rows,
              ["`host` runs the same script with the host's busybox: the floor."]),
        Table(f"restore -> first exec result, interleaved (target ratio <= "
              f"{r['target_ratio']:g}x)", ["mounts", "n", "p50", "p99", "ratio (p50)"], [
                  ["none", str(rs["no_mounts"]["n"]), fmt_s(rs["no_mounts"]["median"]),
                   fmt_s(rs["no_mounts"]["p99"]), fmt_x(1.0)],
                  ["two host directories", str(rs["two_host_directories"]["n"]),
                   fmt_s(rs["two_host_directories"]["median"]),
                   fmt_s(rs["two_host_directories"]["p99"]),
                   fmt_x(r["ratio_two_mounts_over_none"])],
                  ["one sized volume (ext4 disk)", str(rs["one_sized_volume"]["n"]),
                   fmt_s(rs["one_sized_volume"]["median"]),
                   fmt_s(rs["one_sized_volume"]["p99"]),
                   fmt_x(rs["one_sized_volume"]["median"] / rs["no_mounts"]["median"])]]),
        Table("closing the VM (same runs): a sized volume mounted read-write makes the guest "
              "sync and power off", ["mounts", "p50", "p99"],
              [[k.replace("_", " "), fmt_s(v["median"]), fmt_s(v["p99"])]
               for k, v in r["close"].items()]),
    ]


def bench_jail(r: dict[str, Any]) -> list[Table]:
    rows = []
    for name, label in (("restore_to_first_exec", "restore -> first exec result"),
                        ("cold_run_no_snapshot", "cold `run --no-snapshot true` (CLI)")):
        off, on = r["paths"][name]["off"], r["paths"][name]["required"]
        rows.append([label, str(off["n"]), fmt_s(off["median"]), fmt_s(on["median"]),
                     f"{(on['median'] - off['median']) * 1000:+.1f} ms",
                     fmt_x(on["median"] / off["median"]),
                     "yes" if r["within_target"][name] else "no"])
    who = "root (no user namespace)" if r["root"] else "an ordinary user (user namespace)"
    return [Table(f"QEMU in its jail against without, interleaved, medians, run by {who} "
                  f"(target: at most {r['target_ms']:g} ms or "
                  f"{(r['target_ratio'] - 1) * 100:.0f} %, whichever is larger)",
                  ["path", "n", "unconfined", "confined", "cost", "ratio", "within target"],
                  rows, [f"bubblewrap alone (the same namespaces, running true): "
                         f"{fmt_s(r['bare_jail']['median'])} median of "
                         f"{r['bare_jail']['n']}."])]


def bench_hostile(r: dict[str, Any]) -> list[Table]:
    q = r["quiet"]
    rows = [["(quiet)", str(q["n"]), fmt_s(q["median"]), fmt_s(q["p99"]), fmt_x(1.0), "-",
             "-", "-"]]
    for name, a in r["attacks"].items():
        lat = a["latency"]
        rows.append([name, str(lat["n"]), fmt_s(lat["median"]), fmt_s(lat["p99"]),
                     fmt_x(a["ratio_p50"]), f"{a['hostile_cpu_s']:.1f} s",
                     f"{a['hostile_peak_rss'] >> 20} MiB",
                     f"{a['drained_bytes'] >> 20} MiB" if a["drained_bytes"] else "-"])
    return [Table(f"a neighbour VM's `exec true` while a hostile VM attacks ({r['seconds']:g} s "
                  f"each; target p50 ratio <= {r['target_ratio']:g}x)",
                  ["attack", "execs", "p50", "p99", "ratio (p50)", "hostile QEMU CPU",
                   f"hostile QEMU peak RSS ({r['hostile_memory_mib']} MiB guest)",
                   "stdout read by the host"], rows)]


def bench_oci(r: dict[str, Any]) -> list[Table]:
    s, ratios, target = r["summary"], r["ratio_median_vs_baseline"], r["target_ratio"]
    engine = "podman + supermachine-runtime"
    rows = [[name, fmt_s(v["median"]), fmt_s(v["p99"]), fmt_x(ratios[name]),
             ("yes" if ratios[name] <= target else "NO") if name == engine else ""]
            for name, v in s.items()]
    v = r.get("versions", {})
    return [Table(f"`IMAGE true` through podman with supermachine-runtime, podman with runc, "
                  f"and `supermachine run` (busybox, {r['reps']} interleaved reps; accel "
                  f"{r['machine']['accel']})",
                  ["command", "p50", "p99", f"/ {r['baseline']} (p50)", f"<= {target}x"],
                  rows, [f"{k}: {v[k]}" for k in sorted(v)])]


def bench_service(r: dict[str, Any]) -> list[Table]:
    t, cli, api, rtt = r["targets"], r["cli"], r["api_acquire"], r["exec_rtt"]
    svc, loc = "service", "in-process"

    def row(label: str, n: int, a: dict[str, Any], b: dict[str, Any], target: str) -> list[str]:
        return [label, str(n), fmt_s(a["median"]), fmt_s(a["p99"]), fmt_s(b["median"]),
                fmt_s(b["p99"]), fmt_x(a["median"] / b["median"]), target]

    def met(ok: bool) -> str:
        return "yes" if ok else "NO"

    cs, ac = cli["summary"], api["summary"]
    tty = "service, stdin a terminal"

    def cli_target(mode: str) -> str:
        return (f"p50 <= {fmt_s(t['cli_service_p50_s'])}: "
                + met(cs[mode]["median"] <= t["cli_service_p50_s"]))

    rs = rtt["summary"]
    out = [Table(
        f"the service against the in-process paths (busybox, accel {r['machine']['accel']}; "
        "every pool full before each rep, so each service rep is a pool hit)",
        ["measure", "n", "service p50", "service p99", "in-process p50", "in-process p99",
         "service / in-process (p50)", "target"], [
            row("`run IMAGE echo x`, whole process (in-process: `--no-service`)", cli["reps"],
                cs[svc], cs[loc], cli_target(svc)),
            row("  the same, the service's with stdin a terminal (no stdin to pass on)",
                cli["reps"], cs[tty], cs[loc], cli_target(tty)),
            row("acquire -> first exec result (API `create` / `Pool.acquire()`)", api["reps"],
                ac[svc]["total"], ac[loc]["total"],
                f"p50 <= {fmt_s(t['api_acquire_to_first_exec_p50_s'])}: "
                + met(ac[svc]["total"]["median"] <= t["api_acquire_to_first_exec_p50_s"])),
            row("  of which acquire", api["reps"], ac[svc]["acquire"], ac[loc]["acquire"], ""),
            row("  of which first exec", api["reps"], ac[svc]["first_exec"],
                ac[loc]["first_exec"], ""),
            row("exec true round trip (HTTP on one sandbox / `vm.exec` on a warm VM)",
                rtt["calls"], rs[svc], rs[loc],
                f"ratio <= {t['exec_rtt_ratio_p50']:g}x: "
                + met(rtt["ratio_service_over_in_process"] <= t["exec_rtt_ratio_p50"])),
        ], [f"pool of {r['pool_sizes']['cli_and_api']} on both sides; the close / release "
            "after each acquire is untimed.",
            "CLI processes get stdin /dev/null, which `run` passes on to the workload (any "
            "stdin that is not a terminal is); the second row gives the service's a pty "
            "instead, as at a shell (in-process columns: the `--no-service` row's)."])]
    tp = r["throughput"]
    rows = []
    for name in (svc, loc):
        x = tp[name]
        cyc = x["cycle"]
        ratio = x["per_minute_median"] / tp[loc]["per_minute_median"] \
            if tp[loc]["per_minute_median"] else 0.0
        rows.append([name, f"{x['per_minute_median']:.0f}", str(x["cycles"]),
                     fmt_s(cyc["median"]) if cyc else "-", fmt_s(cyc["p99"]) if cyc else "-",
                     f"{x['hits']} / {x['misses']}", fmt_x(ratio)])
    out.append(Table(
        f"throughput: sandboxes created, exec'd (`true`) and destroyed per minute "
        f"({r['threads']} client threads, pool of {r['pool_sizes']['throughput']} (max "
        f"{r['pool_sizes']['throughput']}), {r['rounds']} x {r['window_s']:g} s window each, "
        "rounds alternating)",
        ["path", "per minute (median of rounds)", "cycles", "cycle p50", "cycle p99",
         "pool hits / misses", "/ in-process"], rows,
        ["service: `create` + `exec` + `close` over HTTP; in-process: `Pool.acquire()` + "
         "`exec` + `release()`; a cycle counts when it ends inside the window."]))
    p = r["service_process"]

    def stopped(seconds: float | None) -> str:
        return fmt_s(seconds) if seconds is not None else "no exit within 120 s (killed)"

    left = p["leftover_processes"] + [f"VM directory {d}" for d in p["leftover_vm_dirs"]]
    out.append(Table("the serve process", ["measure", "value"], [
        ["VmRSS, idle (started without pools; no sandboxes)", mib(p["serve_rss_idle"])],
        [f"VmRSS, pool of {r['pool_sizes']['cli_and_api']} ready", mib(p["serve_rss_pool2"])],
        [f"VmRSS, pool of {r['pool_sizes']['throughput']} ready", mib(p["serve_rss_pool8"])],
        ["VmRSS, after the throughput window (pool refilled)",
         mib(p["serve_rss_after_throughput"])],
        ["VmRSS, at the end (pools deleted, no sandboxes)", mib(p["serve_rss_end_no_pools"])],
        [f"VM processes (QEMU + passt), PSS sum, pool of {r['pool_sizes']['cli_and_api']}",
         mib(p["vm_pss_pool2"])],
        [f"VM processes (QEMU + passt), PSS sum, pool of {r['pool_sizes']['throughput']}",
         mib(p["vm_pss_pool8"])],
        ["start-up: Popen to service.json (no pools)", fmt_s(p["idle_startup_s"])],
        [f"pool of {r['pool_sizes']['cli_and_api']} full, after service.json",
         fmt_s(p["pool2_ready_after_service_json_s"])],
        [f"pool of {r['pool_sizes']['throughput']} full, after create_pool",
         fmt_s(p["pool8_fill_s"])],
        ["SIGTERM to exit, idle", stopped(p["idle_stop_s"])],
        [f"SIGTERM to exit, {p['vm_processes_at_stop']} VM processes (a pool and a sandbox)",
         stopped(p["stop_s"])],
        ["left after SIGTERM (qemu-system, passt, VM directories)", ", ".join(left) or "none"],
    ]))
    return out


TABLES: dict[str, Callable[[dict[str, Any]], list[Table]]] = {
    "bench_run": bench_run, "bench_pull": bench_pull, "bench_exec": bench_exec,
    "bench_snapshot": bench_snapshot, "bench_net": bench_net, "bench_peers": bench_peers,
    "bench_cli": bench_cli, "bench_previous": bench_previous, "bench_kernel": bench_kernel,
    "bench_volumes": bench_volumes, "bench_jail": bench_jail, "bench_hostile": bench_hostile,
    "bench_oci": bench_oci, "bench_service": bench_service,
}
