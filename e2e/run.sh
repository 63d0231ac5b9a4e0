#!/usr/bin/env bash
# End-to-end tests of the PowerSync write path with the real @powersync/node SDK.
# Installs exactly what the lockfiles pin, builds the connector (and runs its unit tests),
# then runs the e2e suite against target/debug/crudgate (or $CRUDGATE_BIN).
# Needs: Node 20+, npm, a C/C++ toolchain (better-sqlite3 may build from source), and a built
# crudgate (cargo build -p crudgate-cli).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"

bin="${CRUDGATE_BIN:-$repo/target/debug/crudgate}"
if [ ! -x "$bin" ]; then
  echo "e2e: crudgate binary not found at $bin; build it with: cargo build -p crudgate-cli" >&2
  exit 1
fi
export CRUDGATE_BIN="$bin"

# npm ci, skipped when node_modules was installed from the same lockfile (better-sqlite3 may
# take minutes to compile).
install() {
  local dir="$1" stamp sum
  stamp="$dir/node_modules/.crudgate-installed"
  sum="$(cat "$dir/package.json" "$dir/package-lock.json" | sha256sum | cut -d' ' -f1)-$(node --version)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; then
    echo "(node_modules in $dir up to date)"
    return
  fi
  (cd "$dir" && npm ci --no-audit --no-fund)
  echo "$sum" > "$stamp"
}

echo "== clients/js: install, build, unit tests"
install "$repo/clients/js"
(cd "$repo/clients/js" && npm test)

echo "== e2e: install"
install "$here"

echo "== e2e: tests"
cd "$here" && npm test
