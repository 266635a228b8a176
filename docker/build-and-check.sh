#!/usr/bin/env bash
# Build docker/Dockerfile (CPU) with podman on a machine without a registry, run it, and check the container:
# /ready answers 200, POST /predict answers what a local `kosmos-serve serve --model demo` answers, the user is not
# root, the HEALTHCHECK is in the image and passes, SIGTERM stops it within 10 s. Prints the build times and size.
#
# Needs root, podman, runc, mmdebstrap, curl, and kosmos-serve importable by $PYTHON (for the local answer).
# The base image is made from this machine's Debian mirror (its apt sources file), and pip in the build uses this
# machine's pip configuration (`pip config list`), copied and mounted read-only with the paths it names: the image
# keeps nothing of the host. Everything lives in a temporary folder; at the end the container and the images this
# run made are removed (KEEP=1 keeps the image $TAG and the base; a base already here is used and kept).
#   docker/build-and-check.sh                      # from anywhere; a few minutes
#   KEEP=1 docker/build-and-check.sh               # then run the image as the script does (runc, explicit ulimits):
#   podman --runtime runc run --rm --ulimit nofile=$(ulimit -Hn):$(ulimit -Hn) --ulimit nproc=32768:32768 \
#     -p 127.0.0.1:8000:8000 localhost/kosmos-serve:cpu
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C  # a dot in $EPOCHREALTIME, whatever the locale

TAG=${TAG:-localhost/kosmos-serve:cpu}
BASE=${BASE:-localhost/kosmos-serve-base:bookworm}
TORCH=${TORCH:-torch==2.13.0}  # the CPU wheel pip's configuration holds here; another torch request pulls gigabytes
PYTHON=${PYTHON:-python3}
APT_SOURCES=${APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}
[ -e "$APT_SOURCES" ] || APT_SOURCES=/etc/apt/sources.list
NAME=kosmos-serve-check-$$  # the container
STOP_LIMIT_S=10

W=$(mktemp -d)
made_base=0
local_pid=""
cleanup() {
    podman rm --force --time 0 "$NAME" >/dev/null 2>&1 || true
    [ -n "$local_pid" ] && kill "$local_pid" 2>/dev/null || true
    if [ "${KEEP:-0}" != 1 ]; then
        podman rmi "$TAG" >/dev/null 2>&1 || true
        [ "$made_base" = 1 ] && { podman rmi "$BASE" >/dev/null 2>&1 || true; }
    fi
    rm -rf "$W"
}
trap cleanup EXIT
say() { echo "== $*"; }
since() { awk -v start="$1" -v now="$EPOCHREALTIME" 'BEGIN { printf "%.1f", now - start }'; }  # seconds since START
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_ready() {  # URL: poll /ready for up to 180 s
    for _ in $(seq 900); do
        curl -fs -o /dev/null "$1/ready" && return 0
        sleep 0.2
    done
    echo "$1/ready never answered 200" >&2
    return 1
}

# crun fails here and podman's default ulimits are refused: runc, and the limits this machine allows.
cat > "$W/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$W/containers.conf"

# pip in the build: this machine's pip configuration as one pip.conf (environment variables win over files, as in
# pip), read through PIP_CONFIG_FILE, with every path it names mounted read-only under /mnt (an index from its root,
# the folder above .../simple, whose pages link to ../../files/...). /mnt itself is a folder of this run ($W/mnt)
# that holds the mount points, so the image gets no trace of them.
declare -A pip_settings=()
while IFS= read -r line; do
    key=${line%%=*}
    value=${line#*=}; value=${value#\'}; value=${value%\'}
    pip_settings[${key#*.}]=$value
done < <("$PYTHON" -m pip config list > "$W/pip-config"; grep -v '^:env:' "$W/pip-config"; grep '^:env:' "$W/pip-config" || true)
mkdir "$W/mnt"
volumes=(-v "$W/mnt:/mnt:ro")
mount_under_mnt() {  # PATH: mount it at /mnt/PATH in the build's RUN steps
    if [ -d "$1" ]; then mkdir -p "$W/mnt$1"; else mkdir -p "$W/mnt$(dirname "$1")"; touch "$W/mnt$1"; fi
    volumes+=(-v "$1:/mnt$1:ro")
}
{
    echo "[global]"
    for key in "${!pip_settings[@]}"; do
        words=()
        for word in ${pip_settings[$key]}; do
            case $word in
                file:///*) [ -e "${word#file://}" ] && { mount_under_mnt "$(dirname "${word#file://}")"; word=file:///mnt${word#file://}; } ;;
                /*) [ -e "$word" ] && { mount_under_mnt "$word"; word=/mnt$word; } ;;
            esac
            words+=("$word")
        done
        echo "$key = ${words[*]}"
    done
} > "$W/mnt/pip.conf"
say "pip in the build: /mnt/pip.conf"; sed 's/^/   /' "$W/mnt/pip.conf"

if podman image exists "$BASE"; then
    say "base $BASE already here"
else
    say "base $BASE from $APT_SOURCES (mmdebstrap)"
    start=$EPOCHREALTIME
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$W/base.tar" "$APT_SOURCES"
    podman import --quiet --change 'CMD ["/bin/bash"]' "$W/base.tar" "$BASE" >/dev/null
    made_base=1
    rm "$W/base.tar"
    base_s=$(since "$start")
    say "base made in ${base_s} s"
fi

build() {  # --format docker: the OCI format has no HEALTHCHECK
    podman build --pull=never --format docker --from "$BASE" "${volumes[@]}" \
        --build-arg PIP_CONFIG_FILE=/mnt/pip.conf \
        --build-arg TORCH="$TORCH" --build-arg TORCH_INDEX= -f docker/Dockerfile -t "$TAG" . > "$W/build.log" 2>&1 \
        || { tail -n 40 "$W/build.log" >&2; return 1; }
}
say "building $TAG"
start=$EPOCHREALTIME; build; build_s=$(since "$start")
start=$EPOCHREALTIME; build; rebuild_s=$(since "$start")
size_bytes=$(podman image inspect --format '{{.Size}}' "$TAG")
say "built in ${build_s} s; cached rebuild ${rebuild_s} s; size $((size_bytes / 1000000)) MB"
podman images "$TAG"

healthcheck=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$TAG")
case $healthcheck in *"/ready"*) say "HEALTHCHECK: $healthcheck" ;; *) echo "no HEALTHCHECK on /ready: $healthcheck" >&2; exit 1 ;; esac

port=$(free_port)
say "running $NAME on 127.0.0.1:$port"
start=$EPOCHREALTIME
# Without systemd podman cannot run the HEALTHCHECK on a timer and says so on stderr; `podman healthcheck run` below
# runs it once.
podman run -d --name "$NAME" -p "127.0.0.1:$port:8000" "$TAG" > /dev/null 2> "$W/run.err" || { cat "$W/run.err" >&2; exit 1; }
wait_ready "http://127.0.0.1:$port" || { podman logs "$NAME" >&2; exit 1; }
say "ready in $(since "$start") s"

uid=$(podman exec "$NAME" id -u)
[ "$uid" != 0 ] || { echo "the container runs as root" >&2; exit 1; }
say "user: $(podman exec "$NAME" id)"
podman healthcheck run "$NAME" || { echo "the HEALTHCHECK failed" >&2; exit 1; }
say "healthcheck passes"

# The README's request, to the container and to a local `kosmos-serve serve --model demo`: the same answer.
curl -fsS -F content=@examples/scene-four-shapes.png "http://127.0.0.1:$port/predict" > "$W/container.json"
local_port=$(free_port)
"$PYTHON" -m kosmos_serve.cli serve --model demo --port "$local_port" > "$W/local.log" 2>&1 &
local_pid=$!
wait_ready "http://127.0.0.1:$local_port" || { cat "$W/local.log" >&2; exit 1; }
curl -fsS -F content=@examples/scene-four-shapes.png "http://127.0.0.1:$local_port/predict" > "$W/local.json"
kill "$local_pid"; wait "$local_pid" || true; local_pid=""
"$PYTHON" - "$W/container.json" "$W/local.json" <<'EOF'
import json, sys
container, local = (json.load(open(path)) for path in sys.argv[1:])
assert container == local, f"the container answered\n{container}\nwhere kosmos-serve here answers\n{local}"
print("== POST /predict:", json.dumps(container)[:200], "...")
EOF

say "SIGTERM"
start=$EPOCHREALTIME
podman kill --signal TERM "$NAME" >/dev/null
code=$(timeout $((STOP_LIMIT_S + 5)) podman wait "$NAME") || code="none (still running)"
stop_s=$(since "$start")
say "stopped in ${stop_s} s with exit code $code"
podman logs --tail 4 "$NAME"
[ "$code" = 0 ] && awk -v s="$stop_s" -v limit="$STOP_LIMIT_S" 'BEGIN { exit !(s <= limit) }' \
    || { echo "SIGTERM should stop the container with code 0 within ${STOP_LIMIT_S} s" >&2; exit 1; }

say "OK: build ${build_s} s, cached rebuild ${rebuild_s} s, size $((size_bytes / 1000000)) MB, stop ${stop_s} s"
