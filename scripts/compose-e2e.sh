#!/usr/bin/env bash
# The docker compose path, for real: the two daemons in two containers started by
# docker-compose, a migration triggered from outside with the control message that
# compose.yaml documents, digests checked through both QMP endpoints, then a failure
# case (the destination container stopped in the middle of a migration).
#
#   bash scripts/compose-e2e.sh [--rebuild-base] [--no-failure-case] [--keep-image]
#
# Offline by construction: no image registry and no package index is reached from
# inside any container or build.  The steps:
#
#   1. install docker.io, docker-compose and debootstrap with apt-get when missing;
#      start dockerd when no engine answers (and stop it at the end);
#   2. the base image multifd-migrate-base:bookworm, made by make-base-image.sh
#      (debootstrap minbase + python3.11 in /opt/venv, docker import), reused when
#      it exists and was made by the current recipe (--rebuild-base forces it);
#   3. a wheelhouse built on the host (`pip download` of the runtime dependencies
#      and the build backend, binary wheels for the base image's Python), placed
#      with the project in a temporary build context;
#   4. `docker build --network none` of the project Dockerfile with
#      BASE_IMAGE=multifd-migrate-base:bookworm and
#      PIP_OPTIONS="--no-index --find-links /wheels" (the Dockerfile's defaults,
#      python:3.11-slim and PyPI, are what a real user gets);
#   5. `docker-compose up -d` of the repository's compose.yaml, both health checks,
#      network checks (own bridge network, dst resolved to a container address, no
#      published port), the documented `migrate` one-liner through
#      `docker-compose exec -T src`, the documented `digest` lines on both sides;
#   6. failure case: a fresh pair, source devices slowed with qom-set read-bandwidth,
#      migration started, `docker-compose stop dst` while it is active; the source
#      must report "failed" with an error-desc and keep running; then a new dst
#      container (`docker-compose rm` + `up -d dst`) and a second migration that
#      completes with equal digests.
#
# Whatever happens (failure, Ctrl-C, SIGTERM) the trap prints the container logs on
# failure and tears down: `docker-compose down -v --remove-orphans`, the project
# image built here, the temporary directory, and the engine if this script started it.
# The base image stays in /var/lib/docker for the next run.
#
# Environment: PYTHON (host Python with pip, default python3), DOCKER (client,
# default /usr/bin/docker when present), MIGRATE_COMPOSE_PROJECT (compose project
# name, default multifd-e2e), MIGRATE_COMPOSE_FILES (extra compose files, separated
# by ':', added with -f after compose.yaml), MIGRATE_SLOW_BANDWIDTH (per-device
# read-bandwidth in the failure case, default 16M).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROJECT="${MIGRATE_COMPOSE_PROJECT:-multifd-e2e}"
BASE_TAG="multifd-migrate-base:bookworm"
PY="${PYTHON:-python3}"
SLOW_BW="${MIGRATE_SLOW_BANDWIDTH:-16M}"
REBUILD_BASE=0
FAILURE_CASE=1
KEEP_IMAGE=0

usage() { sed -n '2,45p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --rebuild-base) REBUILD_BASE=1 ;;
        --no-failure-case) FAILURE_CASE=0 ;;
        --keep-image) KEEP_IMAGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compose-e2e: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

T0=$SECONDS
STEP_T=$SECONDS
step() {
    printf '\n[compose-e2e %4ds] == %s\n' "$((SECONDS - T0))" "$*"
    STEP_T=$SECONDS
}
indent() { sed 's/^/    /'; }
info() { printf '[compose-e2e %4ds]    %s\n' "$((SECONDS - T0))" "$*"; }
done_step() { info "ok ($((SECONDS - STEP_T)) s)"; }
die() { printf '[compose-e2e %4ds] FAILED: %s\n' "$((SECONDS - T0))" "$*" >&2; exit 1; }

# -- state for the teardown ------------------------------------------------------------
exec 3>&1 4>&2          # the script's stdout and stderr, for the traps
WORK="$(mktemp -d /var/tmp/multifd-compose-e2e.XXXXXX)"
ENGINE_LOG="/var/tmp/multifd-compose-e2e.dockerd.log"
STARTED_DOCKERD=""      # pid of the dockerd this script started
COMPOSE_USED=0          # whether containers or networks may exist
BUILD_STARTED=0         # whether this run (re)built the project image
IMAGE=""
DOCKER=""
COMPOSE=()
SUMMARY="$WORK/summary.txt"
: > "$SUMMARY"

COMPOSE_ARGV=()         # the compose command with the project and its files
compose() { "${COMPOSE_ARGV[@]}" "$@"; }

dump_logs() {
    echo
    echo "----- docker-compose ps -----"
    compose ps 2>&1 || true
    local svc
    for svc in dst src; do
        echo "----- logs of $svc (last 150 lines) -----"
        compose logs --no-color --tail=150 "$svc" 2>&1 || true
    done
    if [ -n "$STARTED_DOCKERD" ] && [ -f "$ENGINE_LOG" ]; then
        echo "----- dockerd warnings and errors (last 20, full log: $ENGINE_LOG) -----"
        grep -E 'level=(warning|error|fatal)' "$ENGINE_LOG" | grep -v 'cleanup warnings' \
            | tail -n 20 || true
    fi
}

stop_engine() {
    local pid="$STARTED_DOCKERD"
    [ -n "$pid" ] || return 0
    info "stopping the engine this script started (dockerd pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        info "dockerd still running after 30 s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    STARTED_DOCKERD=""
}

teardown() {
    local rc=$?
    # the teardown itself is not interruptible: a second Ctrl-C must not leave
    # containers or an engine behind (ignored signals are ignored by its children too)
    trap - EXIT
    trap '' INT TERM
    set +e
    # a signal may have arrived inside a redirected function call: back to the
    # script's own stdout and stderr
    exec 1>&3 2>&4
    step "teardown"
    if [ -n "$RUN_PID" ] && kill -0 "$RUN_PID" 2>/dev/null; then
        # an interrupted long command (docker build, a migration...): end it first, so
        # that the engine cancels its side (a build removes its intermediate container)
        info "stopping the interrupted command (pid $RUN_PID)"
        kill -TERM "$RUN_PID" 2>/dev/null
        for _ in $(seq 20); do kill -0 "$RUN_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$RUN_PID" 2>/dev/null
    fi
    if [ "$rc" -ne 0 ] && [ "$COMPOSE_USED" = 1 ]; then
        dump_logs
    fi
    if [ "$COMPOSE_USED" = 1 ] && [ -n "$DOCKER" ] && "$DOCKER" info >/dev/null 2>&1; then
        compose down -v --remove-orphans -t 5 2>&1 | indent
    fi
    if [ "$BUILD_STARTED" = 1 ] && "$DOCKER" info >/dev/null 2>&1; then
        if [ "$KEEP_IMAGE" = 0 ] && "$DOCKER" image rm -f "$IMAGE" >/dev/null 2>&1; then
            info "removed the project image $IMAGE"
        fi
        # what an interrupted or replaced build leaves: dangling images made FROM the
        # local base (they carry its label); the base image itself stays
        "$DOCKER" image prune -f --filter label=org.multifd-migrate.local-base >/dev/null 2>&1
    fi
    stop_engine
    rm -rf "$WORK"
    if [ "$rc" -eq 0 ]; then
        printf '\n[compose-e2e %4ds] compose-e2e: PASSED in %d s\n' "$((SECONDS - T0))" "$((SECONDS - T0))"
    else
        printf '\n[compose-e2e %4ds] compose-e2e: FAILED (exit %d) after %d s\n' \
            "$((SECONDS - T0))" "$rc" "$((SECONDS - T0))" >&2
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'echo >&3; info "interrupted" >&3; exit 130' INT
trap 'info "terminated" >&3; exit 143' TERM

# Run a long command in the background and wait for it, so that Ctrl-C or SIGTERM
# reach the trap at once instead of after the command.
RUN_PID=""
run() {
    "$@" &
    RUN_PID=$!
    wait "$RUN_PID"
}

# -- 1. tools and engine ---------------------------------------------------------------
step "tools"
[ "$(id -u)" = 0 ] || die "run as root: it starts dockerd and runs debootstrap"
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
    info "apt-get install ${need[*]}"
    run apt-get update -qq >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log"; die "apt-get update"; }
    DEBIAN_FRONTEND=noninteractive run apt-get install -y -q --no-install-recommends \
        "${need[@]}" >>"$WORK/apt.log" 2>&1 || { tail -n 30 "$WORK/apt.log"; die "apt-get install"; }
fi
# The client that matches the engine (docker.io's), not another one earlier on PATH.
if [ -n "${DOCKER:-}" ]; then :
elif [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker
else DOCKER="$(command -v docker)" || die "no docker client"
fi
export DOCKER
if command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
elif "$DOCKER" compose version >/dev/null 2>&1; then
    COMPOSE=("$DOCKER" compose)
else
    die "neither docker-compose nor the docker compose plugin is installed"
fi
COMPOSE_ARGV=("${COMPOSE[@]}" --project-name "$PROJECT" --project-directory "$ROOT" -f "$ROOT/compose.yaml")
if [ -n "${MIGRATE_COMPOSE_FILES:-}" ]; then
    IFS=: read -r -a extra_files <<<"$MIGRATE_COMPOSE_FILES"
    for f in "${extra_files[@]}"; do COMPOSE_ARGV+=(-f "$f"); done
fi
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip (set PYTHON=...)"
info "docker client: $DOCKER ($("$DOCKER" --version))"
info "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"
done_step

step "engine"
if "$DOCKER" info >/dev/null 2>&1; then
    info "an engine is already running: using it, and leaving it running"
else
    # a dockerd that died without cleaning up leaves its pid file behind
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    start_dockerd() {
        # its own session: a Ctrl-C on the terminal must not stop the engine before
        # the teardown has removed the containers
        setsid dockerd "$@" </dev/null >"$ENGINE_LOG" 2>&1 &
        STARTED_DOCKERD=$!
        for _ in $(seq 120); do
            if "$DOCKER" info >/dev/null 2>&1; then
                # the engine's own pid, whatever setsid did
                STARTED_DOCKERD="$(cat /var/run/docker.pid 2>/dev/null || echo "$STARTED_DOCKERD")"
                return 0
            fi
            kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
            sleep 0.5
        done
        tail -n 20 "$ENGINE_LOG" >&2
        stop_engine
        return 1
    }
    info "starting dockerd (log: $ENGINE_LOG)"
    if ! start_dockerd; then
        # Where iptables/nftables are unusable, bridge networking still works for
        # container-to-container traffic without dockerd's NAT and isolation rules.
        info "dockerd did not start; retrying with --iptables=false"
        start_dockerd --iptables=false || die "dockerd does not start (see $ENGINE_LOG)"
    fi
    info "dockerd $("$DOCKER" version -f '{{.Server.Version}}') up, pid $STARTED_DOCKERD"
fi
done_step

# -- 2. base image ---------------------------------------------------------------------
step "base image $BASE_TAG"
base_args=(--tag "$BASE_TAG")
[ "$REBUILD_BASE" = 1 ] && base_args+=(--force)
bash "$ROOT/scripts/make-base-image.sh" "${base_args[@]}" 2>&1 | indent \
    || die "make-base-image.sh failed"
BASE_PY="$("$DOCKER" run --rm --network none "$BASE_TAG" \
    python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
info "base image Python: $BASE_PY"
done_step

# -- 3. build context and wheelhouse ---------------------------------------------------
step "build context with a host-built wheelhouse"
CTX="$WORK/context"
mkdir -p "$CTX/wheels"
tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./venv --exclude=./wheels \
    --exclude=./build --exclude=./dist --exclude=./bench --exclude=./.hypothesis \
    --exclude=./.mypy_cache --exclude=./.pytest_cache --exclude=./.ruff_cache \
    --exclude='*.egg-info' --exclude='__pycache__' -cf - . | tar -C "$CTX" -xf -
# the runtime dependencies and the build backend, as declared in pyproject.toml
mapfile -t reqs < <("$PY" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    d = tomllib.load(f)
print("\n".join(d["project"]["dependencies"] + d["build-system"]["requires"]))
' "$ROOT/pyproject.toml")
arch="$(uname -m)"
info "pip download (cp${BASE_PY/./}, manylinux $arch): ${reqs[*]}"
run "$PY" -m pip download --disable-pip-version-check -q --dest "$CTX/wheels" \
    --only-binary=:all: --implementation cp --python-version "$BASE_PY" \
    --abi "cp${BASE_PY/./}" --platform "manylinux2014_$arch" \
    --platform "manylinux_2_17_$arch" --platform "manylinux_2_28_$arch" \
    "${reqs[@]}" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; die "pip download"; }
info "wheelhouse: $(find "$CTX/wheels" -name '*.whl' -printf '%f\n' | sort | tr '\n' ' ')"
done_step

# -- 4. project image ------------------------------------------------------------------
IMAGE="$(sed -n 's/^[[:space:]]*image:[[:space:]]*\([^[:space:]#]*\).*/\1/p' "$ROOT/compose.yaml" | head -n 1)"
[ -n "$IMAGE" ] || die "no image: in compose.yaml"
step "docker build $IMAGE (FROM $BASE_TAG, no network)"
BUILD_STARTED=1
run "$DOCKER" build --network none --force-rm -t "$IMAGE" \
    --build-arg "BASE_IMAGE=$BASE_TAG" \
    --build-arg "PIP_OPTIONS=--no-index --find-links /wheels" \
    "$CTX" >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; die "docker build"; }
grep -E '^Successfully (installed|built)' "$WORK/build.log" | indent || true
info "image $IMAGE: $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" \
    | awk '{printf "%.0f MB", $1 / 1e6}')"
done_step

# -- helpers for the scenario ----------------------------------------------------------
# The documented one-liners: '#   docker compose exec SERVICE migrate-ctl ARGS'.
documented() {  # documented SERVICE SUBCOMMAND -> the migrate-ctl argv, one line
    sed -n "s/^#[[:space:]]*docker compose exec $1 \\(migrate-ctl .* $2\\( .*\\)\\{0,1\\}\\)[[:space:]]*\$/\\1/p" \
        "$ROOT/compose.yaml" | head -n 1
}
read -r -a MIGRATE <<<"$(documented src migrate)"
read -r -a DIGEST_SRC <<<"$(documented src digest)"
read -r -a DIGEST_DST <<<"$(documented dst digest)"
[ "${#MIGRATE[@]}" -gt 2 ] || die "compose.yaml documents no 'docker compose exec src migrate-ctl ... migrate' line"
[ "${#DIGEST_SRC[@]}" -gt 1 ] && [ "${#DIGEST_DST[@]}" -gt 1 ] \
    || die "compose.yaml documents no digest lines for src and dst"
CTL_SRC=("${DIGEST_SRC[@]:0:${#DIGEST_SRC[@]}-1}")   # migrate-ctl --qmp SOCKET (src)

xc() {  # xc SERVICE CMD... : run a command inside a service's container
    local svc="$1"; shift
    compose exec -T "$svc" "$@" </dev/null
}

cid() { compose ps -q "$1"; }

json_field() {  # json_field EXPR < json  (EXPR over the parsed object "d")
    "$PY" -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"
}

set_read_bandwidth() {  # set_read_bandwidth VALUE : qom-set on every source device, one exec
    xc src sh -c "for dev in \"\$@\"; do ${CTL_SRC[*]} qom-set \"\$dev\" read-bandwidth $1 || exit 1; done" \
        sh "${DEVICES[@]}" || die "qom-set read-bandwidth $1 on the source devices"
}

wait_healthy() {  # wait_healthy SERVICE...
    local svc id health state
    for svc in "$@"; do
        id="$(cid "$svc")"
        [ -n "$id" ] || die "service $svc has no container"
        for _ in $(seq 90); do
            health="$("$DOCKER" inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")"
            state="$("$DOCKER" inspect -f '{{.State.Status}}' "$id")"
            [ "$health" = healthy ] && break
            [ "$state" = running ] || die "$svc is $state, not running"
            [ "$health" = unhealthy ] && die "$svc is unhealthy"
            sleep 1
        done
        [ "$health" = healthy ] || die "$svc not healthy after 90 s (health: $health)"
        info "$svc: healthy (container ${id:0:12})"
    done
}

migrate_and_check() {  # migrate_and_check LABEL : documented migrate, then digests
    local label="$1" out="$WORK/migrate-$1.txt"
    info "docker-compose exec -T src ${MIGRATE[*]}"
    run timeout 600 "${COMPOSE_ARGV[@]}" exec -T src "${MIGRATE[@]}" </dev/null >"$out" 2>&1 || {
        sed 's/^/    | /' "$out"; die "$label: the migration did not complete"; }
    sed 's/^/    | /' "$out"
    grep -q '^status: *completed' "$out" || die "$label: no 'status: completed' in the output"
    {
        echo "== $label: summary printed by migrate-ctl in the src container"
        sed -n '/^status:/,$p' "$out"
    } >>"$SUMMARY"
    check_digests "$label"
}

check_digests() {  # compare the documented digest lines of both sides
    local label="$1" s="$WORK/digest-src.txt" d="$WORK/digest-dst.txt"
    xc src "${DIGEST_SRC[@]}" >"$s" 2>&1 || { cat "$s"; die "$label: src digest"; }
    xc dst "${DIGEST_DST[@]}" >"$d" 2>&1 || { cat "$d"; die "$label: dst digest"; }
    info "src: ${DIGEST_SRC[*]}"; sed 's/^/    | /' "$s"
    info "dst: ${DIGEST_DST[*]}"; sed 's/^/    | /' "$d"
    head -n 1 "$d" | grep -q '^VM: running' || die "$label: the destination VM is not running"
    local sd dd
    sd="$(awk 'NR > 1 { print $1, $NF }' "$s")"
    dd="$(awk 'NR > 1 { print $1, $NF }' "$d")"
    [ -n "$dd" ] || die "$label: no device digests"
    if awk '{ print $2 }' <<<"$dd" | grep -qvE '^[0-9a-f]{16,}$'; then
        die "$label: a destination device has no complete state"
    fi
    [ "$sd" = "$dd" ] || die "$label: digests differ between src and dst"
    info "$label: $(wc -l <<<"$dd") device digests equal on src and dst, destination running"
    { echo "== $label: digests (src = dst)"; cat "$d"; } >>"$SUMMARY"
}

# -- 5. compose up, checks, migration --------------------------------------------------
step "docker-compose up -d (project $PROJECT)"
COMPOSE_USED=1
compose down -v --remove-orphans -t 5 >/dev/null 2>&1 || true   # leftovers of an aborted run
compose up -d --no-build 2>&1 | indent || die "docker-compose up failed"
wait_healthy dst src
done_step

step "network and exposure checks"
NET="${PROJECT}_migration"
for svc in src dst; do
    nets="$("$DOCKER" inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$(cid "$svc")")"
    [ "$nets" = "$NET " ] || die "$svc is on networks '$nets', expected only $NET"
    bindings="$("$DOCKER" port "$(cid "$svc")")"
    [ -z "$bindings" ] || die "$svc publishes ports: $bindings"
done
DST_IP="$("$DOCKER" inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" "$(cid dst)")"
SRC_IP="$("$DOCKER" inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" "$(cid src)")"
RESOLVED="$(xc src getent hosts dst | awk '{ print $1; exit }')"
[ -n "$DST_IP" ] && [ "$RESOLVED" = "$DST_IP" ] || die "dst resolves to '$RESOLVED' in src, container address is '$DST_IP'"
case "$RESOLVED" in 127.*|::1) die "dst resolves to loopback" ;; esac
SUBNET="$("$DOCKER" network inspect -f '{{range .IPAM.Config}}{{.Subnet}}{{end}}' "$NET")"
INTERNAL="$("$DOCKER" network inspect -f '{{.Internal}}' "$NET")"
info "network $NET ($SUBNET, driver bridge, internal=$INTERNAL): src $SRC_IP, dst $DST_IP"
info "inside src, 'dst' resolves to $RESOLVED (the dst container, not loopback)"
for svc in src dst; do
    sock="$(xc "$svc" sh -c 'ls -l /run/migrate/qmp.sock')"
    case "$sock" in s*) ;; *) die "$svc: /run/migrate/qmp.sock is not a unix socket: $sock" ;; esac
done
info "QMP: a unix socket inside each container; no port published by src or dst"
{
    echo "== network: $NET ($SUBNET, internal=$INTERNAL), src $SRC_IP -> dst $DST_IP:4444;"
    echo "   QMP on unix sockets inside the containers, no published ports"
} >>"$SUMMARY"
done_step

step "migration: the documented one-liner, from outside the containers"
migrate_and_check "migration"
done_step

# -- 6. failure case -------------------------------------------------------------------
if [ "$FAILURE_CASE" = 1 ]; then
    step "failure case: a fresh pair, source devices slowed to $SLOW_BW/s each"
    compose up -d --no-build --force-recreate 2>&1 | indent \
        || die "docker-compose up --force-recreate failed"
    wait_healthy dst src
    mapfile -t DEVICES < <(xc src "${DIGEST_SRC[@]}" | awk 'NR > 1 && $1 != "guest" { print $1 }')
    [ "${#DEVICES[@]}" -gt 0 ] || die "no devices on the source"
    set_read_bandwidth "$SLOW_BW"
    info "qom-set read-bandwidth $SLOW_BW on ${DEVICES[*]}"
    done_step

    step "failure case: migrate, then docker-compose stop dst while it is active"
    xc src "${MIGRATE[@]}" --detach || die "migrate --detach"
    status="" sent=0
    for _ in $(seq 120); do
        xc src "${CTL_SRC[@]}" status --json >"$WORK/status.json" 2>&1 || true
        status="$(json_field 'd.get("status", "none")' <"$WORK/status.json" 2>/dev/null || echo '?')"
        sent="$(json_field 'd.get("ram", {}).get("transferred", 0)' <"$WORK/status.json" 2>/dev/null || echo 0)"
        case "$status" in
            active|device) [ "$sent" -ge $((32 << 20)) ] && break ;;
            completed|failed|cancelled) die "the slowed migration ended too early: $status" ;;
        esac
        sleep 0.5
    done
    case "$status" in active|device) ;; *) die "the migration did not become active: $status" ;; esac
    info "source: status $status, $((sent >> 20)) MiB sent"
    # the migration's TCP connections, seen from inside dst: container to container
    conns="$(xc dst python3 -c '
import socket, struct
def addr(h):
    ip, port = h.split(":")
    return "%s:%d" % (socket.inet_ntoa(struct.pack("<I", int(ip, 16))), int(port, 16))
for line in open("/proc/net/tcp").read().splitlines()[1:]:
    f = line.split()
    if f[3] == "01" and int(f[1].split(":")[1], 16) == 4444:
        print(addr(f[1]), "<-", addr(f[2]))
')"
    sed 's/^/    | established on dst: /' <<<"$conns"
    nconn="$(grep -c . <<<"$conns" || true)"
    [ "$nconn" -ge 2 ] || die "expected the main + multifd connections on dst:4444, saw $nconn"
    if grep -qv -- "<- $SRC_IP:" <<<"$conns"; then
        die "a connection to dst:4444 does not come from the src container ($SRC_IP)"
    fi
    info "$nconn TCP connections $SRC_IP -> $DST_IP:4444 (main + multifd channels)"
    OLD_DST="$(cid dst)"
    compose stop dst 2>&1 | indent || die "docker-compose stop dst failed"
    done_step

    step "failure case: the source reports failed with the cause and keeps running"
    for _ in $(seq 120); do
        xc src "${CTL_SRC[@]}" status --json >"$WORK/status.json" 2>&1 || true
        status="$(json_field 'd.get("status", "none")' <"$WORK/status.json" 2>/dev/null || echo '?')"
        case "$status" in failed|completed|cancelled) break ;; esac
        sleep 0.5
    done
    xc src "${CTL_SRC[@]}" status >"$WORK/status.txt" 2>&1 || true
    sed 's/^/    | /' "$WORK/status.txt"
    [ "$status" = failed ] || die "the source reports '$status', expected failed"
    cause="$(json_field 'd.get("error-desc", "")' <"$WORK/status.json")"
    [ -n "$cause" ] || die "the failed migration has no error-desc"
    qstatus="$(xc src "${CTL_SRC[@]}" raw query-status)"
    info "source query-status: $(tr -d '\n ' <<<"$qstatus")"
    [ "$(json_field 'd["running"]' <<<"$qstatus")" = True ] || die "the source VM does not run"
    [ "$("$DOCKER" inspect -f '{{.State.Status}}' "$(cid src)")" = running ] || die "src container stopped"
    wait_healthy src
    {
        echo "== failure case: dst stopped during the migration ($((sent >> 20)) MiB sent)"
        echo "   source: status failed, error-desc: $cause"
        echo "   source VM after the failure: $(tr -d '\n' <<<"$qstatus" | tr -s ' ')"
    } >>"$SUMMARY"
    set_read_bandwidth 0
    info "read-bandwidth back to 0 (unlimited) on ${DEVICES[*]}"
    done_step

    step "failure case: docker-compose up of a new destination"
    compose rm -f -s dst 2>&1 | indent || die "docker-compose rm dst failed"
    compose up -d --no-build dst 2>&1 | indent || die "docker-compose up -d dst failed"
    info "dst container created"
    wait_healthy dst
    NEW_DST="$(cid dst)"
    [ "$NEW_DST" != "$OLD_DST" ] || die "dst is the same container as before"
    info "new dst container ${NEW_DST:0:12} (the stopped one was ${OLD_DST:0:12})"
    done_step

    step "failure case: second migration to the new destination"
    migrate_and_check "second migration (after the failure)"
    done_step
fi

step "summary"
sed 's/^/    /' "$SUMMARY"
