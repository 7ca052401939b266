#!/bin/sh
# Makes sure what `npm run demo` (MODE demo) or `npm test` (MODE test) needs is here, installing
# what is missing: the pinned Deno through npm (npm ci: the lock is complete), and the system
# packages through apt-get when root on Debian; otherwise it names exactly what to install and
# exits 2. Leaves the checkout clean (node_modules/ is ignored).
set -eu
MODE=${1:-test}
cd "$(dirname "$0")/.."

# --- system packages: binary -> Debian package ----------------------------------------------------
need() { # BINARY PACKAGE: adds PACKAGE when BINARY is not on PATH
  command -v "$1" >/dev/null 2>&1 || MISSING="$MISSING $2"
}
MISSING=""
need qemu-system-x86_64 qemu-system-x86
if [ "$MODE" = test ]; then
  need qemu-storage-daemon qemu-system-common
  need qemu-img qemu-utils
  need busybox busybox-static
  need fio fio
  need cpio cpio
  need gzip gzip
  need tar tar
  need unshare util-linux
  need xz xz-utils
  ls /boot/vmlinuz-* >/dev/null 2>&1 || MISSING="$MISSING linux-image-amd64"
fi
if [ -n "$MISSING" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "mpq setup: apt-get install$MISSING"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -qq --no-install-recommends ca-certificates $MISSING >/tmp/mpq-setup-apt.log 2>&1 ||
      { tail -40 /tmp/mpq-setup-apt.log >&2; exit 2; }
  else
    echo "mpq setup: missing packages:$MISSING" >&2
    echo "  install them with: sudo apt-get install$MISSING" >&2
    exit 2
  fi
fi

# --- Deno, pinned in package.json, from the npm registry -------------------------------------------
want=$(sed -n 's/.*"deno": "\([0-9.]*\)".*/\1/p' package.json)
have=$(node_modules/.bin/deno --version 2>/dev/null | sed -n 's/^deno \([0-9.]*\).*/\1/p' || true)
if [ "$have" != "$want" ]; then
  echo "mpq setup: npm ci (deno $want)"
  npm ci --no-audit --no-fund --loglevel=error
fi
