#!/usr/bin/env bash
# Coverage-guided fuzzing of the guest agent's EXEC parser (fuzz/guest_exec_req.c) with
# clang's libFuzzer under ASan and UBSan, for a fixed time, from a corpus of valid payloads
# the host's own encoder makes. Prints runs, coverage and findings; exits non-zero on a
# finding (its input is kept under fuzz/findings/).
#
#   fuzz/guest.sh [SECONDS] [RESULTS.json]      (default 300 s)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
results=${2:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
make -s -C src/supermachine/guest/init fuzz FUZZ_OUT="$work/fuzz-exec-req"
mkdir -p "$work/corpus" fuzz/findings
.venv/bin/python - "$work/corpus" <<'PY'
import sys
from pathlib import Path
from supermachine.agent import protocol as p
out = Path(sys.argv[1])
cases = [
    p.encode_exec(1, [b"true"]),
    p.encode_exec(3, [b"sh", b"-c", b"echo hi"], env=[b"A=1", b"PATH=/bin"], cwd=b"/w",
                  user=b"1000:1000", flags=3, winsize=(24, 80)),
    p.encode_exec(5, [b"/etc/passwd"], op=p.Op.READ_FILE),
    p.encode_exec(7, [b"/f"], op=p.Op.WRITE_FILE, mode=0o600),
    p.encode_exec(9, [b"src", b"/dst", b"ext4", b""], op=p.Op.MOUNT, mode=2 | 128),
]
for i, frame in enumerate(cases):
    (out / f"seed-{i}").write_bytes(frame[p.HEADER_SIZE:])  # the payload, as parsed
PY
log="$work/fuzz.log"
status=0
"$work/fuzz-exec-req" -max_total_time="$seconds" -max_len=65536 -print_final_stats=1 \
    -artifact_prefix=fuzz/findings/guest-exec-req- "$work/corpus" >"$log" 2>&1 || status=$?
total=$(grep -oE 'Loaded 1 modules +\(([0-9]+) inline' "$log" | grep -oE '[0-9]+' | tail -1)
last=$(grep -E '^#[0-9]+' "$log" | tail -1)
runs=$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$log" | grep -oE '[0-9]+$')
cov=$(echo "$last" | grep -oE 'cov: [0-9]+' | grep -oE '[0-9]+')
ft=$(echo "$last" | grep -oE 'ft: [0-9]+' | grep -oE '[0-9]+')
corpus=$(echo "$last" | grep -oE 'corp: [0-9]+' | grep -oE '[0-9]+')
# coverage of the parser itself (the rest of proto.c is not reachable from this target)
parser=$("$work/fuzz-exec-req" -runs=0 -print_coverage=1 "$work/corpus" 2>&1 |
         grep -oE 'edges: [0-9]+/[0-9]+ exec_req_parse' | grep -oE '[0-9]+/[0-9]+' || true)
findings=$(grep -cE 'ERROR: (AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|libFuzzer)|runtime error|deadly signal' "$log" || true)
echo "guest EXEC parser: ${runs:-?} runs in ${seconds} s, coverage ${cov:-?} of ${total:-?} edges" \
     "(exec_req_parse: ${parser:-?}; ${ft:-?} features, corpus ${corpus:-?}), ${findings}" \
     "findings, libFuzzer exit ${status}"
if [ -n "$results" ]; then
  printf '{"target": "guest exec_req_parse", "seconds": %s, "runs": %s, "edges_covered": %s, "edges_total": %s, "parser_edges": "%s", "features": %s, "corpus": %s, "findings": %s, "exit": %s, "clang": "%s"}\n' \
    "$seconds" "${runs:-null}" "${cov:-null}" "${total:-null}" "${parser:-?}" "${ft:-null}" "${corpus:-null}" \
    "$findings" "$status" "$(clang --version | head -1)" > "$results"
fi
[ "$status" -eq 0 ] && [ "$findings" -eq 0 ] || { tail -30 "$log"; exit 1; }
