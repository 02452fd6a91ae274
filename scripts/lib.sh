# shellcheck shell=bash
# Shared helpers for scripts/run-local, scripts/test and friends: install the real
# servers (cached between runs), start them on 127.0.0.1, wait for them, stop them.
#
# The cache lives in one well-known place so a cold CI run pays for the broker build
# once and every later run on the same machine reuses it.

HOOKPIPE_CACHE="${HOOKPIPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hookpipe}"
TANSU_VERSION="0.6.0"
# The broker is built with the patches in scripts/patches (see ensure_tansu); the suffix
# changes whenever they do, so a cache built without them is not reused.
TANSU_BUILD="$TANSU_VERSION-hookpipe1"
TANSU_BIN="$HOOKPIPE_CACHE/tansu-$TANSU_BUILD/bin/tansu"
# Also patched (scripts/patches, see ensure_bqemulator); the suffix changes with the patches.
BQEMU_VENV="$HOOKPIPE_CACHE/bqemulator-1.4.0-hookpipe1-venv"
BQEMU_BIN="$BQEMU_VENV/bin/bqemulator"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ensure_tansu: build the tansu broker once (about 15 minutes on 2 cores) into the cache.
#
# It is built from crates.io with its own lock file and one patch of ours to tansu-broker
# (scripts/patches/tansu-0.6.0-forming-leader.patch): in 0.6.0 a group whose leader leaves (or
# is expired) while the group is forming keeps waiting for that leader forever, so after a
# broker pause longer than the session timeout no member is ever given partitions again. Real
# Kafka clears the leader; the patch does the same, so the local broker stands in for Kafka
# in the pause tests instead of wedging. Nothing else changes.
ensure_tansu() {
  if [ -x "$TANSU_BIN" ]; then return 0; fi
  log "building tansu $TANSU_BUILD into $HOOKPIPE_CACHE (once; about 15 minutes on 2 cores)"
  command -v patch >/dev/null || apt_install patch
  mkdir -p "$HOOKPIPE_CACHE"
  local tmp="$HOOKPIPE_CACHE/tansu-$TANSU_BUILD.partial" src="$HOOKPIPE_CACHE/tansu-broker-src"
  rm -rf "$tmp" "$src"
  # The published tansu-broker source, from the cargo registry (fetched through a scratch
  # package that depends on exactly that version).
  mkdir -p "$src/scratch/src"
  printf '[package]\nname = "scratch"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\ntansu-broker = { version = "=%s", default-features = false }\n' \
    "$TANSU_VERSION" >"$src/scratch/Cargo.toml"
  : >"$src/scratch/src/lib.rs"
  (cd "$src/scratch" && cargo fetch -q >&2) || die "fetching tansu-broker $TANSU_VERSION failed"
  local crate
  crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"tansu-broker-$TANSU_VERSION.crate" 2>/dev/null | head -1)
  [ -n "$crate" ] || die "tansu-broker-$TANSU_VERSION.crate not found in the cargo cache"
  tar -xzf "$crate" -C "$src" || die "unpacking $crate failed"
  patch -s -p1 -d "$src/tansu-broker-$TANSU_VERSION" <scripts/patches/tansu-0.6.0-forming-leader.patch \
    || die "patching tansu-broker failed"
  cargo install tansu --version "$TANSU_VERSION" --locked --features libsql,dynostore \
    --config "patch.crates-io.tansu-broker.path=\"$src/tansu-broker-$TANSU_VERSION\"" \
    --root "$tmp" --target-dir "$HOOKPIPE_CACHE/tansu-target" >&2 \
    || die "cargo install tansu failed"
  rm -rf "$HOOKPIPE_CACHE/tansu-$TANSU_BUILD"
  mv "$tmp" "$HOOKPIPE_CACHE/tansu-$TANSU_BUILD"
  rm -rf "$HOOKPIPE_CACHE/tansu-target" "$src"
}

# ensure_bqemulator: a private venv with the pinned BigQuery emulator and DuckDB's
# spatial extension installed from its wheel (the emulator cannot download it offline).
#
# One patch of ours (scripts/patches/bqemulator-1.4.0-duckdb-threads.patch): the emulator
# serves REST on its event loop's thread and the Storage Write API on gRPC worker threads, both
# on one DuckDB connection without a lock between them; a REST query while an append is written
# hangs the emulator for good. The patch puts every use of the connection under one lock.
ensure_bqemulator() {
  if [ -x "$BQEMU_BIN" ] && [ -f "$BQEMU_VENV/.hookpipe-ready" ]; then return 0; fi
  command -v patch >/dev/null || apt_install patch
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
  local site
  site=$("$BQEMU_VENV/bin/python" -c 'import bqemulator, os; print(os.path.dirname(os.path.dirname(bqemulator.__file__)))') \
    || die "locating the emulator failed"
  patch -s -p1 -d "$site" <scripts/patches/bqemulator-1.4.0-duckdb-threads.patch \
    || die "patching the emulator failed"
  touch "$BQEMU_VENV/.hookpipe-ready"
}

# venv_with DIR PACKAGE...: a private virtualenv with pinned packages, made once.
venv_with() {
  local dir=$1
  shift
  if [ -f "$dir/.hookpipe-ready" ]; then return 0; fi
  log "installing $* into $dir"
  rm -rf "$dir"
  python3 -m venv "$dir" || die "python3 -m venv failed"
  "$dir/bin/pip" install --quiet --disable-pip-version-check "$@" >&2 \
    || die "pip install $* failed"
  touch "$dir/.hookpipe-ready"
}

# apt_install PACKAGE...: Debian packages (with sudo when not root; updates the package lists
# once if the first try fails).
apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q "$@" >&2 \
    || { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q "$@" >&2; } \
    || die "apt-get install $* failed"
}

# ensure_schemathesis: the API fuzzer, in its own venv (pinned).
SCHEMATHESIS_VENV="$HOOKPIPE_CACHE/schemathesis-4.32.5-venv"
SCHEMATHESIS_BIN="$SCHEMATHESIS_VENV/bin/schemathesis"
ensure_schemathesis() { venv_with "$SCHEMATHESIS_VENV" schemathesis==4.32.5; }

# ensure_snippet_runtimes: what tests/tests/snippets.rs runs the integration snippets with.
# Debian packages for PHP, Ruby, Go (and Java, Node.js, openssl if a machine lacks them), and
# a venv with `requests` for the Python snippet.
SNIPPETS_VENV="$HOOKPIPE_CACHE/snippets-venv"
ensure_snippet_runtimes() {
  local missing=()
  command -v php >/dev/null && php -m 2>/dev/null | grep -qx curl || missing+=(php-cli php-curl)
  command -v ruby >/dev/null || missing+=(ruby)
  command -v go >/dev/null || missing+=(golang-go)
  command -v java >/dev/null || missing+=(default-jdk-headless)
  command -v node >/dev/null || missing+=(nodejs)
  command -v openssl >/dev/null || missing+=(openssl)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
  venv_with "$SNIPPETS_VENV" requests==2.32.3
}

# ensure_node_test_tools: the Node.js packages the integration tests drive, pinned in
# tests/node/package-lock.json: the providers' own webhook-signing libraries (Stripe, GitHub's
# Octokit, Standard Webhooks, Svix) for tests/tests/providers.rs, and playwright-core, which
# drives Debian's Chromium (installed here when missing) for tests/tests/console.rs.
# Installed into the cache, in a folder named after the lock file's digest, with the scripts of
# tests/node copied beside them (ES modules find their packages next to the script). Sets
# NODE_TEST_TOOLS to that folder.
ensure_node_test_tools() {
  local missing=()
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  command -v chromium >/dev/null || missing+=(chromium)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
  local digest dir
  digest=$(cat tests/node/package.json tests/node/package-lock.json | sha256sum | cut -c1-12)
  dir="$HOOKPIPE_CACHE/node-test-tools-$digest"
  if [ ! -e "$dir/.hookpipe-ready" ]; then
    log "installing the Node.js test tools (npm) into $dir"
    rm -rf "$dir" && mkdir -p "$dir"
    cp tests/node/package.json tests/node/package-lock.json "$dir/"
    (cd "$dir" && npm ci --no-audit --no-fund --silent >&2) || die "npm ci for tests/node failed"
    touch "$dir/.hookpipe-ready"
  fi
  cp tests/node/*.mjs "$dir/"
  NODE_TEST_TOOLS="$dir"
}

# ensure_secured_broker_tools: stunnel (Debian's stunnel4) terminates TLS in front of tansu for
# the secured-broker tests (tests/src/secured.rs); openssl makes their CA and certificates.
ensure_secured_broker_tools() {
  local missing=()
  command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || missing+=(stunnel4)
  command -v openssl >/dev/null || missing+=(openssl)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
  # The package may start a system stunnel; the tests run their own.
  systemctl disable --now stunnel4 >/dev/null 2>&1 || true
}

# ensure_k8s_tools: kubectl (for `kubectl kustomize`; from the machine: it is not in Debian's
# archive), kubernetes-validate in a venv, and Prometheus with promtool (Debian package).
K8S_VENV="$HOOKPIPE_CACHE/kubernetes-validate-1.31.0-venv"
ensure_k8s_tools() {
  command -v kubectl >/dev/null \
    || die "kubectl is needed to render k8s/ (kubectl kustomize); install it (e.g. from the Kubernetes apt repository)"
  if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    apt_install prometheus
    # The package may start a system Prometheus on :9090; the tests run their own.
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  venv_with "$K8S_VENV" kubernetes-validate==1.31.0
}

# --- Running servers -------------------------------------------------------------------

STARTED_PIDS=()

# wait_tcp HOST PORT SECONDS: poll until something listens there.
wait_tcp() {
  local host=$1 port=$2 deadline=$((SECONDS + $3))
  until (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# wait_http URL SECONDS: poll until the URL answers 2xx.
wait_http() {
  local url=$1 deadline=$((SECONDS + $2))
  until curl -sf -o /dev/null "$url"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# port_free PORT: fail with a clear message if something already listens on 127.0.0.1:PORT.
port_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    die "127.0.0.1:$1 is already in use (another run still going? stop it first)"
  fi
}

# start_broker DIR PORT: tansu on 127.0.0.1:PORT with its sqlite file in DIR.
start_broker() {
  local dir=$1 port=$2
  port_free "$port"
  mkdir -p "$dir"
  # tansu resolves sqlite:// paths relative to its working directory. Its own process group
  # (setsid): Ctrl-C in the terminal reaches the script, which stops the broker last, after
  # the sink has left its group.
  (cd "$dir" && exec setsid "$TANSU_BIN" broker \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine "sqlite://tansu.db" >"$dir/broker.log" 2>&1) &
  STARTED_PIDS+=($!)
  echo $! >"$dir/broker.pid"
  wait_tcp 127.0.0.1 "$port" 30 || die "broker did not start; see $dir/broker.log"
  log "broker listening on 127.0.0.1:$port (log: $dir/broker.log)"
}

# start_emulator DIR REST_PORT GRPC_PORT: bqemulator with its data in DIR.
start_emulator() {
  local dir=$1 rest=$2 grpc=$3
  port_free "$rest"
  port_free "$grpc"
  mkdir -p "$dir/data"
  setsid "$BQEMU_BIN" start --rest-host 127.0.0.1 --rest-port "$rest" \
      --grpc-host 127.0.0.1 --grpc-port "$grpc" --project local-project \
      --persistent --data-dir "$dir/data" --log-level warning >"$dir/emulator.log" 2>&1 &
  STARTED_PIDS+=($!)
  echo $! >"$dir/emulator.pid"
  wait_http "http://127.0.0.1:$rest/readyz" 60 || die "emulator did not start; see $dir/emulator.log"
  log "BigQuery emulator on 127.0.0.1:$rest (gRPC $grpc, log: $dir/emulator.log)"
}

# The topics' max.message.bytes for the gateway's default body limit (1 MiB): body + 64 KiB for
# the envelope + 1 KiB framing (ingest-gateway's required_message_bytes); the parking topic
# holds a main-topic record plus the reason, 4 KiB more. The gateway checks the main topic.
MAIN_TOPIC_MAX_MESSAGE_BYTES=1115136
PARKING_TOPIC_MAX_MESSAGE_BYTES=1119232

# create_topic PORT NAME PARTITIONS [MAX_MESSAGE_BYTES]: create unless it exists.
create_topic() {
  local port=$1 name=$2 partitions=$3 out config=()
  [ -z "${4:-}" ] || config=(--config "max.message.bytes=$4")
  if out=$("$TANSU_BIN" topic create --broker "tcp://127.0.0.1:$port" --partitions "$partitions" "${config[@]}" "$name" 2>&1); then
    log "topic $name created ($partitions partitions)"
  elif grep -q "already exists" <<<"$out"; then
    log "topic $name exists"
  else
    die "creating topic $name failed: $out"
  fi
}

# stop_pid PID SECONDS: SIGTERM, wait up to SECONDS for the exit, then SIGKILL.
stop_pid() {
  local pid=$1 deadline=$((SECONDS + $2))
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  wait "$pid" 2>/dev/null || true
}

# stop_started: stop everything this script started, newest first, each one waited for before
# the next (so the sink leaves its group and commits before the broker goes away).
stop_started() {
  local i
  for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
    stop_pid "${STARTED_PIDS[$i]}" 25
  done
  STARTED_PIDS=()
}
