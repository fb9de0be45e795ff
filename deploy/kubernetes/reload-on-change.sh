#!/bin/sh
# The config-reloader sidecar: when the mounted configuration changes, send SIGHUP to the
# fastproxy master, which validates the new file and applies it without closing a connection.
#
# The kubelet updates a mounted ConfigMap or Secret in place (a new ..data directory, swapped
# atomically) within about a minute of an apply; nothing tells the process. This loop compares
# a checksum of the watched files every RELOAD_INTERVAL_S seconds. The pod shares its process
# namespace (shareProcessNamespace: true), so the master is found in /proc: the process whose
# command line runs `fastproxy run -c $FASTPROXY_CONFIG` and whose parent is not one (its
# workers are forks with the same command line).
#
#   FASTPROXY_CONFIG   the file fastproxy runs with (default /etc/fastproxy/fastproxy.toml)
#   RELOAD_WATCH       the files whose change means a reload (default: every file beside it,
#                      the certificate and key of the projected Secret included)
#   RELOAD_INTERVAL_S  seconds between two looks (default 5)
set -u
config="${FASTPROXY_CONFIG:-/etc/fastproxy/fastproxy.toml}"
watch="${RELOAD_WATCH:-$(dirname "$config")/*}"
interval="${RELOAD_INTERVAL_S:-5}"

log() {
    echo "config-reloader: $*" >&2
}

checksum() {
    # shellcheck disable=SC2086  # $watch is a list of files or a glob on purpose
    cat $watch 2>/dev/null | cksum
}

cmdline() {
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null
}

is_fastproxy() {
    case "$(cmdline "$1")" in
        *"fastproxy run -c $config "*) return 0 ;;
    esac
    return 1
}

masters() {
    for dir in /proc/[0-9]*; do
        pid="${dir#/proc/}"
        is_fastproxy "$pid" || continue
        parent="$(awk '/^PPid:/ { print $2 }' "$dir/status" 2>/dev/null)"
        if [ -n "$parent" ] && [ "$parent" != 0 ] && is_fastproxy "$parent"; then
            continue  # a worker
        fi
        echo "$pid"
    done
}

last="$(checksum)"
log "watching $watch every ${interval}s for fastproxy run -c $config"
while sleep "$interval"; do
    now="$(checksum)"
    [ "$now" = "$last" ] && continue
    found=""
    for pid in $(masters); do
        if kill -HUP "$pid"; then
            log "configuration changed: SIGHUP sent to the fastproxy master ($pid)"
            found=1
        fi
    done
    if [ -n "$found" ]; then
        last="$now"
    else
        log "configuration changed, but no fastproxy master was found; trying again"
    fi
done
