#!/usr/bin/env bash
# The containerd end-to-end tests once per containerd version (`make test`
# runs them after the whole suite, which uses the system's containerd).
# Each version's binaries come from the dir scripts/deps.sh unpacked them
# into; HYPERBOX_CONTAINERD_DIR makes the tests start that containerd, its
# ctr and its runc shim (tests/common/skip.rs `which`). Every version runs
# even if one fails; the summary names each version and how it came out.
#
#   scripts/containerd-matrix.sh [VERSION...]    default: $CONTAINERD_VERSIONS
set -uo pipefail
cd "$(dirname "$0")/.."

cache="${HYPERBOX_CONTAINERD_CACHE:-/var/cache/hyperbox}"
versions=("$@")
((${#versions[@]})) || read -ra versions <<<"${CONTAINERD_VERSIONS:-1.7 2}"
# The tests that start containerd and exercise what differs between its
# versions: ctr pulls and runs, CRI pulls, containerd restarts, gc
# (snapshotter_e2e), containers reading through restarts (restart_e2e), crashes and faults under containerd (faults_e2e), a
# converted image on a vanilla containerd (convert_e2e), what a container
# sees (security_e2e), a CRI pull with a pull secret through hyperboxd's
# CRI image service proxy (private_images_e2e), and what `hyperbox pull`
# reports (pull_report_e2e).
read -ra tests <<<"${CONTAINERD_TESTS:-snapshotter_e2e restart_e2e faults_e2e convert_e2e security_e2e private_images_e2e pull_report_e2e}"
test_args=()
for t in "${tests[@]}"; do test_args+=(--test "$t"); done

export HYPERBOX_REQUIRE_E2E=1
results=()
status=0
for v in "${versions[@]}"; do
  bin="$cache/containerd-$v/bin"
  echo
  echo "=== containerd $v ($bin, Debian $(cat "$bin/../debian-version" 2>/dev/null || echo '?')): ${tests[*]}"
  if ! "$bin/containerd" --version; then
    echo "containerd $v is missing from $bin: run scripts/deps.sh (make deps)" >&2
    results+=("containerd $v: MISSING")
    status=1
    continue
  fi
  if HYPERBOX_CONTAINERD_DIR="$bin" ${CARGO:-cargo} test "${test_args[@]}"; then
    results+=("containerd $v: passed")
  else
    results+=("containerd $v: FAILED")
    status=1
  fi
done
echo
echo "containerd matrix (${tests[*]}):"
printf '  %s\n' "${results[@]}"
exit "$status"
