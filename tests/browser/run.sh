#!/usr/bin/env bash
# The browser tests: every tests/browser/*.test.mjs, in turn, against a built tern binary
# (MQTT.js and pages in headless Chromium through playwright-core).
#
#   tests/browser/run.sh                        # TERN_BIN defaults to the release build
#   TERN_BIN=/path/to/tern tests/browser/run.sh
#
# Builds nothing: TERN_BIN defaults to $CARGO_TARGET_DIR/release/tern (target/release/tern
# without CARGO_TARGET_DIR; a relative CARGO_TARGET_DIR is taken from the repository root, as
# .ci/run's cargo does). Installs what the tests need when it is missing: the npm packages of
# package-lock.json (`npm ci`, again whenever the lockfile changed since the last install) and
# Chromium at /usr/bin/chromium (apt-get, as root or through sudo). Each test makes its own
# temporary directory, picks free ports, starts and stops its own tern, prints one line per
# check and exits non-zero on a failure. Ends with `browser: N passed, M failed` (test files);
# exits 0 only when every file passed.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$HERE"

if [ -z "${TERN_BIN:-}" ]; then
    TARGET=${CARGO_TARGET_DIR:-target}
    case "$TARGET" in
        /*) ;;
        *) TARGET="$REPO/$TARGET" ;;
    esac
    TERN_BIN="$TARGET/release/tern"
fi
case "$TERN_BIN" in
    /*) ;;
    *) TERN_BIN="$(pwd)/$TERN_BIN" ;;
esac
if [ ! -x "$TERN_BIN" ]; then
    echo "browser: no tern binary at $TERN_BIN; build it first (cargo build --release) or set TERN_BIN" >&2
    exit 2
fi
export TERN_BIN

for tool in node npm openssl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "browser: required tool '$tool' not found" >&2
        exit 2
    fi
done

# npm ci when node_modules is missing or was installed from another lockfile.
STAMP=node_modules/.tern-package-lock.json
if [ ! -d node_modules ] || ! cmp -s package-lock.json "$STAMP"; then
    echo "browser: npm ci"
    npm ci --no-audit --no-fund --loglevel=error || { echo "browser: npm ci failed" >&2; exit 2; }
    cp package-lock.json "$STAMP"
fi

if [ ! -x /usr/bin/chromium ]; then
    echo "browser: installing chromium (apt-get)"
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -n)
    else
        echo "browser: /usr/bin/chromium is missing and installing it needs root (or sudo)" >&2
        exit 2
    fi
    { "${SUDO[@]}" apt-get update -q \
        && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
        || { echo "browser: apt-get install chromium failed" >&2; exit 2; }
fi
echo "browser: $(/usr/bin/chromium --version 2>/dev/null | head -n 1), node $(node --version), tern $TERN_BIN"

PASSED=0
FAILED=0
shopt -s nullglob
TESTS=(*.test.mjs)
if [ ${#TESTS[@]} -eq 0 ]; then
    echo "browser: no *.test.mjs in $HERE" >&2
    exit 2
fi
for t in "${TESTS[@]}"; do
    echo "--- $t"
    # Each test bounds its own waits; this only catches a test that hangs regardless.
    if timeout --kill-after=10 300 node "$t"; then
        PASSED=$((PASSED + 1))
    else
        status=$?
        echo "--- $t FAILED (status $status)"
        FAILED=$((FAILED + 1))
    fi
done
echo "browser: $PASSED passed, $FAILED failed"
[ $FAILED -eq 0 ]
