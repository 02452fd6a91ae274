# shellcheck shell=bash
# Shared helpers for scripts/run-local, scripts/test and friends: install the real
# servers (cached between runs), start them on 127.0.0.1, wait for them, stop them.
#
# The cache lives in one well-known place so a cold CI run pays for the broker build
# once and every later run on the same machine reuses it.

HOOKPIPE_CACHE="${HOOKPIPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hookpipe}"
TANSU_VERSION="0.6.0"
TANSU_BIN="$HOOKPIPE_CACHE/tansu-$TANSU_VERSION/bin/tansu"
BQEMU_VENV="$HOOKPIPE_CACHE/bqemulator-1.4.0-venv"
BQEMU_BIN="$BQEMU_VENV/bin/bqemulator"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ensure_tansu: build the tansu broker once (about 15 minutes on 2 cores) into the cache.
ensure_tansu() {
  if [ -x "$TANSU_BIN" ]; then return 0; fi
  log "building tansu $TANSU_VERSION into $HOOKPIPE_CACHE (once; about 15 minutes on 2 cores)"
  mkdir -p "$HOOKPIPE_CACHE"
  local tmp="$HOOKPIPE_CACHE/tansu-$TANSU_VERSION.partial"
  rm -rf "$tmp"
  cargo install tansu --version "$TANSU_VERSION" --locked --features libsql,dynostore \
    --root "$tmp" --target-dir "$HOOKPIPE_CACHE/tansu-target" >&2 \
    || die "cargo install tansu failed"
  rm -rf "$HOOKPIPE_CACHE/tansu-$TANSU_VERSION"
  mv "$tmp" "$HOOKPIPE_CACHE/tansu-$TANSU_VERSION"
  rm -rf "$HOOKPIPE_CACHE/tansu-target"
}

# ensure_bqemulator: a private venv with the pinned BigQuery emulator and DuckDB's
# spatial extension installed from its wheel (the emulator cannot download it offline).
ensure_bqemulator() {
  if [ -x "$BQEMU_BIN" ] && [ -f "$BQEMU_VENV/.hookpipe-ready" ]; then return 0; fi
  log "installing bqemulator 1.4.0 into $BQEMU_VENV"
  rm -rf "$BQEMU_VENV"
  python3 -m venv "$BQEMU_VENV" || die "python3 -m venv failed"
  "$BQEMU_VENV/bin/pip" install --quiet --disable-pip-version-check \
    bqemulator==1.4.0 duckdb==1.5.5 duckdb-extension-spatial==1.5.5 numpy >&2 \
    || die "pip install bqemulator failed"
  "$BQEMU_VENV/bin/python" - <<'PY' >&2 || die "installing the duckdb spatial extension failed"
import duckdb, duckdb_extension_spatial as d, glob, os
p = glob.glob(os.path.join(os.path.dirname(d.__file__), 'extensions', 'v*', 'spatial.duckdb_extension'))[0]
duckdb.connect().execute(f"INSTALL '{p}'")
PY
  touch "$BQEMU_VENV/.hookpipe-ready"
}
