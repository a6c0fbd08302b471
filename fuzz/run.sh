#!/usr/bin/env bash
# Run one fuzz target under atheris/libFuzzer for a number of minutes.
#
#   fuzz/run.sh TARGET MINUTES [more libFuzzer flags]
#   fuzz/run.sh virtqueue 30
#   fuzz/run.sh all 5                 # every target, one after the other
#
# The seed corpus (fuzz/corpus/TARGET) is copied to a scratch directory first, so the
# committed seeds never change; new inputs stay in the scratch corpus (its path is printed).
# Crashes, escaped exceptions, hangs (-timeout) and leaks land in fuzz/findings/TARGET/.
# libFuzzer's final line (#runs, cov: edges of hvframe's Python code, ft: features, corp:)
# and its -print_final_stats block are printed at the end, and the whole log is kept.
# PYTHON picks the interpreter (default: python3 on PATH, e.g. an activated venv);
# FUZZ_WORKDIR the scratch directory (default: a new one under /tmp).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
targets=(virtqueue virtio_blk ahci pci_config fw_cfg uart)
python="${PYTHON:-python3}"

usage() {
    echo "usage: $0 TARGET MINUTES [libFuzzer flags...]   (TARGET: ${targets[*]} or all)" >&2
    exit 2
}
[ $# -ge 2 ] || usage
target="$1"; minutes="$2"; shift 2
[[ "$minutes" =~ ^[0-9]+([.][0-9]+)?$ ]] || usage

if [ "$target" = all ]; then
    status=0
    for t in "${targets[@]}"; do
        "$0" "$t" "$minutes" "$@" || status=1
    done
    exit $status
fi
[ -f "$here/targets/$target.py" ] || usage

# hvframe's lock-order checker (hvframe/concurrency.py, when present): a violation is logged
# as an error, which the targets report as a finding. HVFRAME_LOCK_CHECK=0 turns it off.
export HVFRAME_LOCK_CHECK="${HVFRAME_LOCK_CHECK:-1}"

seconds=$("$python" -c "import sys; print(max(1, int(float(sys.argv[1]) * 60)))" "$minutes")
work="${FUZZ_WORKDIR:-$(mktemp -d /tmp/hvframe-fuzz-XXXXXX)}/$target"
mkdir -p "$work/corpus" "$here/findings/$target"
cp "$here/corpus/$target"/* "$work/corpus/" 2>/dev/null || true
log="$work/fuzz.log"

echo "== $target for $minutes min ($seconds s); corpus $work/corpus; log $log"
set +e
"$python" "$here/targets/$target.py" \
    -max_total_time="$seconds" -print_final_stats=1 -timeout=60 -rss_limit_mb=4096 \
    -max_len=4096 -artifact_prefix="$here/findings/$target/" "$@" "$work/corpus" \
    >"$log" 2>&1
rc=$?
set -e
rmdir "$here/findings/$target" "$here/findings" 2>/dev/null || true   # kept only for findings

echo "== $target: exit status $rc"
grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)' "$log" | tail -n 2 || true
grep -E '^stat::' "$log" || true
if [ $rc -ne 0 ]; then
    echo "== $target: FINDING -- see $log and $here/findings/$target/"
    grep -nE 'Finding|Error|Traceback|==[0-9]+==|ALARM|Test unit written' "$log" \
        | head -n 40 || true
fi
exit $rc
