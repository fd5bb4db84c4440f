#!/usr/bin/env bash
# Entrypoint of the gpt2-deploy images (cpu, cuda, tensorrt, jetson); also runs outside a container.
#
#   entrypoint.sh [serve] [EXTRA SERVE FLAGS...]  check the environment; with the tensorrt backend,
#                                                 build an engine when none in the bundle runs on
#                                                 this GPU; then exec `gpt2-deploy serve`
#   entrypoint.sh build                           only the engine step (a Kubernetes init container)
#   entrypoint.sh health                          `gpt2-deploy health` on the local port (HEALTHCHECK)
#   entrypoint.sh CMD [ARGS...]                   exec anything else (bash, gpt2-deploy inspect ...)
#
# Configuration (environment; an empty value means "not set"):
#   GPT2_DEPLOY_BUNDLE          bundle directory (default /models/bundle)
#   GPT2_DEPLOY_BUNDLE_SOURCE   read-only bundle copied to GPT2_DEPLOY_BUNDLE first when that holds no
#                               manifest.json (so an engine can be written beside a baked/mounted one)
#   GPT2_DEPLOY_BACKEND         onnxruntime (default) | tensorrt | torch
#   GPT2_DEPLOY_DEVICE          cpu | cuda | cuda:N
#   GPT2_DEPLOY_HOST            interface (default 0.0.0.0)
#   GPT2_DEPLOY_PORT            gRPC port (default 8081, KServe's h2c port)
#   GPT2_DEPLOY_METRICS_PORT    Prometheus /metrics port (default 8082; 0 = off)
#   GPT2_DEPLOY_PARITY          off | warn (default) | strict
#   GPT2_DEPLOY_GRACE, GPT2_DEPLOY_DRAIN_DELAY, GPT2_DEPLOY_MAX_CONNECTION_AGE,
#   GPT2_DEPLOY_MAX_CONNECTION_AGE_GRACE, GPT2_DEPLOY_SHADOW_RATE, GPT2_DEPLOY_MAX_WAIT_MS  seconds/rates
#   GPT2_DEPLOY_MAX_BATCH_SIZE, GPT2_DEPLOY_MAX_QUEUE, GPT2_DEPLOY_MAX_BATCH_TOKENS,
#   GPT2_DEPLOY_MAX_PREFILL_TOKENS, GPT2_DEPLOY_THREADS                                    integers
#   GPT2_DEPLOY_TLS_CERT, GPT2_DEPLOY_TLS_KEY, GPT2_DEPLOY_TLS_CLIENT_CA,
#   GPT2_DEPLOY_AUTH_TOKEN_FILE                                                             file paths
#   GPT2_DEPLOY_TRT_RUNTIME     auto | tensorrt | tensorrt_lean;  GPT2_DEPLOY_ENGINE: engine file
#   GPT2_DEPLOY_TRUST_ENGINE_HOST_CODE  1 | true: --trust-engine-host-code (load version-compatible
#                               plans that embed the lean runtime; only for bundles you trust)
#   GPT2_DEPLOY_LOG_LEVEL       DEBUG | INFO | WARNING | ERROR
#   GPT2_DEPLOY_SERVE_ARGS      more `serve` flags, split on spaces
#   GPT2_DEPLOY_ENGINE_BUILD    tensorrt only: auto (default: build when no engine runs here) |
#                               always | never (fail when no engine runs here)
#   GPT2_DEPLOY_PRESET          build preset: server (default) | orin-nano | orin-nx | agx-orin |
#                               auto (Jetson: from GPT2_DEPLOY_JETSON_MODEL_FILE, default
#                               /proc/device-tree/model; orin-nano where it cannot be read)
#   GPT2_DEPLOY_BUILD_ARGS      more `build` flags, split on spaces (e.g. --version-compatible)
#   GPT2_DEPLOY_HEALTH_TIMEOUT  seconds for `health` (default 5)
#   GPT2_DEPLOY_HEALTH_ARGS     more `health` flags, split on spaces: with TLS --tls-ca FILE
#                               [--tls-server-name NAME], with mutual TLS also --tls-cert/--tls-key
#
# Signals: `serve` is exec'ed, so the server itself is the process (PID 1 in a container) and gets
# SIGTERM directly: health NOT_SERVING -> drain -> exit 0. An engine build runs as a child; SIGTERM
# or SIGINT during it is forwarded, and the script exits 143 / 130 once the build has stopped.
#
# Exit codes: 0 clean stop / build done / SERVING; 1 health not SERVING; 2 the server could not
# start; 3 --parity strict refused to start; 64 bad configuration (the message lists every
# problem); 69 no engine can run here and none could be built; 130/143 stopped during a build.
set -euo pipefail

readonly EX_CONFIG=64 EX_ENGINE=69
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly HERE
PYTHON="${GPT2_DEPLOY_PYTHON:-python3}"

log() { printf 'entrypoint: %s\n' "$*" >&2; }
die() {
  local code="$1"
  shift
  printf 'entrypoint: error: %s\n' "$*" >&2
  exit "$code"
}

BUNDLE="${GPT2_DEPLOY_BUNDLE:-/models/bundle}"
BACKEND="${GPT2_DEPLOY_BACKEND:-onnxruntime}"
HOST="${GPT2_DEPLOY_HOST:-0.0.0.0}"
PORT="${GPT2_DEPLOY_PORT:-8081}"
METRICS_PORT="${GPT2_DEPLOY_METRICS_PORT:-8082}"
PARITY="${GPT2_DEPLOY_PARITY:-warn}"
ENGINE_BUILD="${GPT2_DEPLOY_ENGINE_BUILD:-auto}"
PRESET="${GPT2_DEPLOY_PRESET:-server}"

problems=()
check_int() { # NAME VALUE: a non-negative integer, when set
  [[ -z "$2" || "$2" =~ ^[0-9]+$ ]] || problems+=("$1='$2' is not a non-negative integer")
}
check_num() { # NAME VALUE: a non-negative number, when set
  [[ -z "$2" || "$2" =~ ^[0-9]+([.][0-9]+)?$ ]] || problems+=("$1='$2' is not a non-negative number")
}
check_port() {
  if [[ ! "$2" =~ ^[0-9]+$ ]] || ((10#$2 > 65535)); then
    problems+=("$1='$2' is not a port number (0-65535)")
  fi
}
check_choice() { # NAME VALUE CHOICE...
  local name="$1" value="$2" c
  shift 2
  for c in "$@"; do [[ "$value" == "$c" ]] && return 0; done
  problems+=("$name='$value' is not one of: $*")
}

check_config() {
  check_choice GPT2_DEPLOY_BACKEND "$BACKEND" onnxruntime tensorrt torch
  check_choice GPT2_DEPLOY_PARITY "$PARITY" off warn strict
  check_choice GPT2_DEPLOY_ENGINE_BUILD "$ENGINE_BUILD" auto always never
  check_port GPT2_DEPLOY_PORT "$PORT"
  check_port GPT2_DEPLOY_METRICS_PORT "$METRICS_PORT"
  [[ -z "${GPT2_DEPLOY_DEVICE:-}" || "$GPT2_DEPLOY_DEVICE" =~ ^(cpu|cuda(:[0-9]+)?)$ ]] ||
    problems+=("GPT2_DEPLOY_DEVICE='$GPT2_DEPLOY_DEVICE' is not cpu, cuda or cuda:N")
  [[ -z "${GPT2_DEPLOY_TRT_RUNTIME:-}" ]] ||
    check_choice GPT2_DEPLOY_TRT_RUNTIME "$GPT2_DEPLOY_TRT_RUNTIME" auto tensorrt tensorrt_lean
  [[ -z "${GPT2_DEPLOY_TRUST_ENGINE_HOST_CODE:-}" ]] || check_choice GPT2_DEPLOY_TRUST_ENGINE_HOST_CODE \
    "$GPT2_DEPLOY_TRUST_ENGINE_HOST_CODE" 0 1 false true
  [[ -z "${GPT2_DEPLOY_LOG_LEVEL:-}" ]] ||
    check_choice GPT2_DEPLOY_LOG_LEVEL "$GPT2_DEPLOY_LOG_LEVEL" DEBUG INFO WARNING ERROR
  local v
  for v in GRACE DRAIN_DELAY MAX_CONNECTION_AGE MAX_CONNECTION_AGE_GRACE SHADOW_RATE MAX_WAIT_MS; do
    v="GPT2_DEPLOY_$v"
    check_num "$v" "${!v:-}"
  done
  for v in MAX_BATCH_SIZE MAX_QUEUE MAX_BATCH_TOKENS MAX_PREFILL_TOKENS THREADS; do
    v="GPT2_DEPLOY_$v"
    check_int "$v" "${!v:-}"
  done
  command -v gpt2-deploy >/dev/null || problems+=("gpt2-deploy is not on PATH ($PATH)")
}

report_problems() {
  ((${#problems[@]} == 0)) && return 0
  printf 'entrypoint: error: bad configuration:\n' >&2
  printf '  - %s\n' "${problems[@]}" >&2
  exit "$EX_CONFIG"
}

prepare_bundle() { # GPT2_DEPLOY_BUNDLE holds a bundle afterwards (copied from the source if need be)
  local src="${GPT2_DEPLOY_BUNDLE_SOURCE:-}"
  if [[ -n "$src" && ! -f "$BUNDLE/manifest.json" && -f "$src/manifest.json" ]]; then
    log "copying the bundle $src -> $BUNDLE"
    mkdir -p "$BUNDLE"
    cp -R "$src/." "$BUNDLE/"
  fi
  local also=""
  [[ -n "$src" ]] && also=", nor at GPT2_DEPLOY_BUNDLE_SOURCE=$src"
  [[ -f "$BUNDLE/manifest.json" ]] ||
    die "$EX_CONFIG" "no bundle at GPT2_DEPLOY_BUNDLE=$BUNDLE (no manifest.json)$also: mount one" \
      "there, or bake one into the image with --build-arg BUNDLE=DIR"
}

jetson_preset() { # the orin preset of this board, from its device-tree model string
  local file="${GPT2_DEPLOY_JETSON_MODEL_FILE:-/proc/device-tree/model}" model
  if [[ ! -r "$file" ]]; then # container runtimes mask /sys/firmware (where /proc/device-tree points)
    log "GPT2_DEPLOY_PRESET=auto: cannot read $file; using orin-nano, whose budget fits every Orin" \
      "(set GPT2_DEPLOY_PRESET=orin-nx or agx-orin for the bigger boards)"
    echo orin-nano
    return 0
  fi
  model="$(tr -d '\0' <"$file")"
  case "$model" in
    *"AGX Orin"*) echo agx-orin ;;
    *"Orin NX"*) echo orin-nx ;;
    *"Orin Nano"*) echo orin-nano ;;
    *) die "$EX_CONFIG" "GPT2_DEPLOY_PRESET=auto: no preset for '$model'; set GPT2_DEPLOY_PRESET" ;;
  esac
}

child=""
forward() { # SIGTERM/SIGINT during a build: stop the build, then exit 128+signal
  local sig="$1" code="$2"
  log "received SIG$sig during the engine build; stopping it"
  [[ -n "$child" ]] && kill "-$sig" "$child" 2>/dev/null || true
  [[ -n "$child" ]] && wait "$child" 2>/dev/null || true
  exit "$code"
}

ensure_engine() { # tensorrt: make sure an engine in the bundle runs on this GPU
  [[ "$BACKEND" == tensorrt ]] || return 0
  local device="${GPT2_DEPLOY_DEVICE:-cuda}" index=0 status rc=0 trust=()
  [[ "$device" == cuda:* ]] && index="${device#cuda:}"
  trusted && trust=(--trust-engine-host-code)
  if [[ "$ENGINE_BUILD" != always ]]; then
    status="$("$PYTHON" "$HERE/engine_status.py" "$BUNDLE" --device "$index" \
      --runtime "${GPT2_DEPLOY_TRT_RUNTIME:-auto}" "${trust[@]}")" || rc=$?
    log "$status"
    ((rc == 0)) && return 0
    ((rc == 1)) || die "$EX_CONFIG" "cannot read the bundle at $BUNDLE"
    [[ "$ENGINE_BUILD" == never ]] &&
      die "$EX_ENGINE" "no engine in $BUNDLE can run here and GPT2_DEPLOY_ENGINE_BUILD=never"
  fi
  [[ -w "$BUNDLE" ]] || die "$EX_CONFIG" "cannot build an engine: $BUNDLE is not writable;" \
    "set GPT2_DEPLOY_BUNDLE_SOURCE to copy a read-only bundle to a writable GPT2_DEPLOY_BUNDLE"
  local preset="$PRESET"
  [[ "$preset" == auto ]] && preset="$(jetson_preset)"
  # shellcheck disable=SC2206 # word splitting of the extra flags is intended
  local build_cmd=(gpt2-deploy build "$BUNDLE" --preset "$preset" --device "$index" --no-progress
    ${GPT2_DEPLOY_BUILD_ARGS:-})
  log "building a TensorRT engine for this GPU: ${build_cmd[*]}"
  trap 'forward TERM 143' TERM
  trap 'forward INT 130' INT
  rc=0
  "${build_cmd[@]}" &
  child=$!
  wait "$child" || rc=$? # a trapped signal interrupts this wait and runs forward()
  trap - TERM INT
  child=""
  ((rc == 0)) || die "$EX_ENGINE" "the engine build failed (gpt2-deploy build exited $rc; its" \
    "message is above); the server was not started"
  log "engine built"
}

trusted() { [[ "${GPT2_DEPLOY_TRUST_ENGINE_HOST_CODE:-}" =~ ^(1|true)$ ]]; }

serve_args() { # the serve command line from the environment, flags only where set
  args=(gpt2-deploy serve "$BUNDLE" --backend "$BACKEND" --host "$HOST" --port "$PORT"
    --metrics-port "$METRICS_PORT" --parity "$PARITY")
  local pair flag var
  for pair in device:DEVICE grace:GRACE drain-delay:DRAIN_DELAY max-connection-age:MAX_CONNECTION_AGE \
    max-connection-age-grace:MAX_CONNECTION_AGE_GRACE shadow-rate:SHADOW_RATE \
    max-batch-size:MAX_BATCH_SIZE max-queue:MAX_QUEUE max-batch-tokens:MAX_BATCH_TOKENS \
    max-prefill-tokens:MAX_PREFILL_TOKENS max-wait-ms:MAX_WAIT_MS threads:THREADS \
    trt-runtime:TRT_RUNTIME engine:ENGINE log-level:LOG_LEVEL tls-cert:TLS_CERT tls-key:TLS_KEY \
    tls-client-ca:TLS_CLIENT_CA auth-token-file:AUTH_TOKEN_FILE; do
    flag="${pair%%:*}" var="GPT2_DEPLOY_${pair#*:}"
    [[ -n "${!var:-}" ]] && args+=("--$flag" "${!var}")
  done
  trusted && args+=(--trust-engine-host-code)
  # shellcheck disable=SC2206 # word splitting of the extra flags is intended
  args+=(${GPT2_DEPLOY_SERVE_ARGS:-})
}

mode="${1:-serve}"
[[ $# -gt 0 ]] && shift
case "$mode" in
  serve)
    check_config
    report_problems
    prepare_bundle
    ensure_engine
    serve_args
    log "exec ${args[*]} $*"
    exec "${args[@]}" "$@"
    ;;
  build)
    [[ "$BACKEND" == tensorrt ]] || problems+=("build: GPT2_DEPLOY_BACKEND must be tensorrt, got '$BACKEND'")
    check_config
    report_problems
    prepare_bundle
    ensure_engine
    ;;
  health)
    check_port GPT2_DEPLOY_PORT "$PORT"
    check_num GPT2_DEPLOY_HEALTH_TIMEOUT "${GPT2_DEPLOY_HEALTH_TIMEOUT:-}"
    report_problems
    target="$HOST"
    [[ "$target" == 0.0.0.0 || "$target" == "::" || "$target" == "[::]" ]] && target=127.0.0.1
    [[ "$target" == *:* && "$target" != \[* ]] && target="[$target]"
    # shellcheck disable=SC2206 # word splitting of the extra flags is intended
    extra=(${GPT2_DEPLOY_HEALTH_ARGS:-})
    exec gpt2-deploy health --server "$target:$PORT" --timeout "${GPT2_DEPLOY_HEALTH_TIMEOUT:-5}" \
      "${extra[@]}" "$@"
    ;;
  *)
    exec "$mode" "$@"
    ;;
esac
