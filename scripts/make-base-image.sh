#!/usr/bin/env bash
# Build a local stand-in for python:3.11-slim, for machines that can reach Debian's
# package mirror but no container registry (this is what scripts/compose-e2e.sh uses).
#
#   scripts/make-base-image.sh [--tag TAG] [--mirror URL] [--force]
#
# How: debootstrap --variant=minbase of Debian bookworm (its python3 is 3.11, so the
# cp311 wheels built on the host install into it) with python3 and python3-venv, a
# virtualenv in /opt/venv made from Debian's own bundled pip wheel (no index needed),
# then `docker import` with /opt/venv/bin first on PATH: `python3 -m pip install`
# and the console scripts behave as in python:3.11-slim.  The image has one layer,
# about 140 MB, and no apt lists or .deb caches.
#
# The image carries two labels, inherited by every image built FROM it:
# org.multifd-migrate.local-base=SUITE and org.multifd-migrate.base-recipe=the sha256
# of this script (compose-e2e.sh reuses an image whose recipe matches and rebuilds it
# otherwise; its teardown prunes dangling images by the first label).
#
# Needs: root, debootstrap, a running docker engine, and the Debian mirror that apt is
# configured with (read from /etc/apt/sources.list{,.d/*}; --mirror overrides).
set -euo pipefail

TAG="multifd-migrate-base:bookworm"
SUITE="bookworm"
MIRROR=""
FORCE=0
DOCKER="${DOCKER:-$(command -v /usr/bin/docker || command -v docker || true)}"

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --tag) TAG="$2"; shift 2 ;;
        --mirror) MIRROR="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "make-base-image: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done

log() { printf '[make-base-image] %s\n' "$*"; }
die() { printf '[make-base-image] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and docker need it)"
[ -n "$DOCKER" ] || die "no docker client found"
command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install debootstrap"
"$DOCKER" info >/dev/null 2>&1 || die "the docker engine is not running"

RECIPE="$(sha256sum "$0" | cut -c1-16)"

if [ "$FORCE" = 0 ] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    have="$("$DOCKER" image inspect \
            -f '{{index .Config.Labels "org.multifd-migrate.base-recipe"}}' "$TAG" 2>/dev/null || true)"
    if [ "$have" = "$RECIPE" ]; then
        log "$TAG is up to date (recipe $RECIPE); --force rebuilds it"
        exit 0
    fi
    log "$TAG was made by another recipe (${have:-none}), rebuilding"
fi

# The mirror apt already uses: deb822 "URIs:" (debian.sources) or one-line "deb URL".
if [ -z "$MIRROR" ]; then
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        MIRROR="$(awk '
            /^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }
            /^deb[ \t]/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\// && $i ~ /debian\/?$/ \
                           && $i !~ /security/) { print $i; exit } }' "$f")"
        [ -n "$MIRROR" ] && break
    done
fi
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

WORK="$(mktemp -d /var/tmp/multifd-base.XXXXXX)"
ROOTFS="$WORK/rootfs"
cleanup() {
    # debootstrap may leave /proc or /sys mounted in the target when it fails
    for m in proc sys dev/pts dev; do
        mountpoint -q "$ROOTFS/$m" 2>/dev/null && umount -l "$ROOTFS/$m" || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

start=$SECONDS
log "debootstrap --variant=minbase $SUITE from $MIRROR (python3, python3-venv)"
if ! debootstrap --variant=minbase --include=python3,python3-venv \
        "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2
    [ -f "$ROOTFS/debootstrap/debootstrap.log" ] && tail -n 30 "$ROOTFS/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
fi
log "debootstrap done in $((SECONDS - start)) s"

PYVER="$(chroot "$ROOTFS" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$PYVER" in
    3.1[1-9]) ;;
    *) die "$SUITE has Python $PYVER; the project needs >= 3.11" ;;
esac

# /opt/venv plays the part of python:3.11-slim's /usr/local: pip works there without
# --break-system-packages, and Debian's python3 stays untouched.
chroot "$ROOTFS" /usr/bin/python3 -m venv /opt/venv
chroot "$ROOTFS" /opt/venv/bin/python3 -m pip --version

# Trim: apt caches and lists (no apt-get runs in the image), docs, man pages, locales.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/locale/* "$ROOTFS"/var/log/*.log "$ROOTFS"/var/cache/debconf/*-old \
       "$ROOTFS"/debootstrap
find "$ROOTFS/usr/lib/python3" "$ROOTFS/usr/lib/python3.11" "$ROOTFS/opt/venv" \
     -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
# docker manages these in every container
: > "$ROOTFS/etc/hostname"
: > "$ROOTFS/etc/resolv.conf"

OLD_ID="$("$DOCKER" image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)"
log "docker import as $TAG"
tar --numeric-owner -C "$ROOTFS" -cf - . | "$DOCKER" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL org.multifd-migrate.local-base=$SUITE org.multifd-migrate.base-recipe=$RECIPE" \
    --change 'CMD ["python3"]' \
    --message "debootstrap $SUITE minbase + python3 $PYVER in /opt/venv (scripts/make-base-image.sh)" \
    - "$TAG" >/dev/null

# the image this one replaces, unless something still uses it
[ -n "$OLD_ID" ] && "$DOCKER" image rm "$OLD_ID" >/dev/null 2>&1 || true
"$DOCKER" run --rm --network none "$TAG" python3 -c \
    'import sys, pip; print("python", sys.version.split()[0], "pip", pip.__version__, "at", sys.prefix)'
log "$TAG built in $((SECONDS - start)) s ($("$DOCKER" image inspect -f '{{.Size}}' "$TAG" \
    | awk '{printf "%.0f MB", $1 / 1e6}'))"
