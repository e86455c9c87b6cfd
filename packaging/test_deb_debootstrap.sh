#!/usr/bin/env bash
# Install dist/gpusoc-agent_*.deb into a clean Debian 12 root (debootstrap, minbase: no Python)
# and run the agent there as its service account, in simulation. Needs root, debootstrap and
# network to a Debian mirror; the first run caches the bootstrapped root as a tarball.
#
#   sudo packaging/test_deb_debootstrap.sh [path/to/gpusoc-agent.deb]
#
# What it checks (each prints PASS/FAIL; the exit status is the number of failures):
#   install with dpkg alone (no apt dependencies), the account, conffiles and modes, no Python
#   on the target, the agent refusing to start without certificates, a simulated agent with
#   mTLS from a dev PKI and a console certificate watching it, the training SDK socket, the
#   Prometheus /metrics endpoint (when this build has metrics_listen), the unit's offline
#   security score, and remove/purge. With systemd-nspawn on the host (apt-get install
#   systemd-container) it also boots a second root with systemd and runs the packaged,
#   hardened unit for real: seccomp, no capabilities, read-only /etc, GPU device nodes still
#   openable (fake /dev/nvidia0: ENXIO, not EPERM), the online security score, stop and purge.
#   SYSTEMD_TEST=0 skips that part.
# Host side it uses python3 with the gpusoc sources (for the SDK sender) and curl or python3
# for /metrics; the chroot shares the host's network, so it uses loopback ports 17443-17445.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

DEB=${1:-$(ls -t dist/gpusoc-agent_*.deb 2>/dev/null | head -1)}
[ -f "$DEB" ] || { echo "no .deb: run packaging/build_deb.sh first" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "must run as root (debootstrap, chroot)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "apt-get install debootstrap" >&2; exit 2; }

WORK=${WORK:-build/debootstrap}
CACHE=$WORK/bookworm-minbase.tar
ROOT=$WORK/root
MIRROR=${MIRROR:-http://deb.debian.org/debian}
mkdir -p "$WORK"
LOG=$WORK/transcript.txt
: >"$LOG"
failures=0
PIDS=()

say() { echo "$*" | tee -a "$LOG"; }
check() {  # check "description" command...
    local what=$1; shift
    if "$@" >>"$LOG" 2>&1; then say "PASS  $what"; else say "FAIL  $what"; failures=$((failures + 1)); fi
}
in_root() { chroot "$ROOT" "$@"; }
as_agent() { chroot --userspec=gpusoc:gpusoc "$ROOT" env -i PATH=/usr/bin:/bin HOME=/var/lib/gpusoc "$@"; }

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    for m in "$ROOT/proc" "$ROOT/dev"; do mountpoint -q "$m" && umount -l "$m"; done
}
trap cleanup EXIT

start_agent() {  # start_agent LOGFILE command... ; runs as gpusoc in the background
    local out=$1; shift
    # No function or subshell in between: $! must be the agent itself, so kill stops it.
    chroot --userspec=gpusoc:gpusoc "$ROOT" env -i PATH=/usr/bin:/bin HOME=/var/lib/gpusoc "$@" >"$out" 2>&1 &
    PIDS+=($!)
}

stop_agents() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    PIDS=()
}

# ---------------------------------------------------------------- clean root
cleanup
for port in 17443 17444 17445; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is in use (an agent from an earlier run?); stop it first" >&2; exit 2
    fi
done
rm -rf "$ROOT"
if [ ! -f "$CACHE" ]; then
    say "== debootstrap --variant=minbase bookworm (first run; cached in $CACHE)"
    t0=$(date +%s)
    debootstrap --variant=minbase bookworm "$WORK/bootstrap" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; exit 2; }
    tar -C "$WORK/bootstrap" -cf "$CACHE" .
    rm -rf "$WORK/bootstrap"
    say "debootstrap took $(( $(date +%s) - t0 )) s"
fi
mkdir -p "$ROOT"
tar -C "$ROOT" -xf "$CACHE"
mount -t proc proc "$ROOT/proc"
mount --bind /dev "$ROOT/dev"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
say "== target: $(in_root cat /etc/debian_version), glibc $(in_root ldd --version | head -1 | awk '{print $NF}')"
say "== package: $DEB ($(du -h "$DEB" | cut -f1))"

check "target has no Python (the agent must bring its own)" in_root sh -c '! command -v python3'

# ---------------------------------------------------------------- install
cp "$DEB" "$ROOT/tmp/gpusoc-agent.deb"
t0=$(date +%s%N)
check "dpkg -i installs with no other packages" in_root dpkg -i /tmp/gpusoc-agent.deb
say "      install took $(( ($(date +%s%N) - t0) / 1000000 )) ms; installed size $(du -sh "$ROOT/opt/gpusoc-agent" | cut -f1)"
check "service account gpusoc exists, no login shell" \
    sh -c "chroot '$ROOT' getent passwd gpusoc | grep -q ':/var/lib/gpusoc:/usr/sbin/nologin$'"
conffiles=$(chroot "$ROOT" dpkg-query -W -f='${Conffiles}' gpusoc-agent 2>&1)
echo "$conffiles" >>"$LOG"
check "agent.toml and /etc/default/gpusoc-agent are conffiles" \
    sh -c 'echo "$1" | grep -q "/etc/gpusoc/agent.toml " && echo "$1" | grep -q "/etc/default/gpusoc-agent "' _ "$conffiles"
check "/etc/gpusoc/agent.toml is 0640 root:gpusoc" \
    sh -c "[ \"\$(chroot '$ROOT' stat -c '%a %U:%G' /etc/gpusoc/agent.toml)\" = '640 root:gpusoc' ]"
check "/etc/gpusoc/tls is 0750 root:gpusoc" sh -c "[ \"\$(chroot '$ROOT' stat -c '%a %U:%G' /etc/gpusoc/tls)\" = '750 root:gpusoc' ]"
check "/var/lib/gpusoc is 0750 gpusoc:gpusoc" sh -c "[ \"\$(chroot '$ROOT' stat -c '%a %U:%G' /var/lib/gpusoc)\" = '750 gpusoc:gpusoc' ]"
check "unit installed" test -f "$ROOT/usr/lib/systemd/system/gpusoc-agent.service"
check "gpusoc-agent --version runs as the service account" as_agent /usr/bin/gpusoc-agent --version
check "service account cannot write its config" sh -c "! chroot --userspec=gpusoc:gpusoc '$ROOT' sh -c 'echo x >> /etc/gpusoc/agent.toml'"
check "no Qt or DuckDB in the package" sh -c "! find '$ROOT/opt/gpusoc-agent' -iname '*pyside*' -o -iname '*duckdb*' -o -iname 'libQt*' | grep -q ."
if command -v systemd-analyze >/dev/null; then
    score=$(systemd-analyze security --offline=true --root="$ROOT" --no-pager gpusoc-agent.service 2>>"$LOG" \
        | sed -n 's/.*Overall exposure level for gpusoc-agent.service: \([0-9.]*\).*/\1/p')
    say "      systemd-analyze security --offline=true --root: ${score:-?}"
    check "unit exposure <= 4.0" awk -v s="${score:-99}" 'BEGIN { exit !(s <= 4.0) }'
fi

# ---------------------------------------------------------------- refuses to start without certificates
# systemd makes /run/gpusoc (RuntimeDirectory=); there is no systemd in this root.
install -d -m 0755 "$ROOT/run/gpusoc" && chroot "$ROOT" chown gpusoc:gpusoc /run/gpusoc
out=$(as_agent /usr/bin/gpusoc-agent run --config /etc/gpusoc/agent.toml --simulate-gpus 1 2>&1); rc=$?
echo "$out" >>"$LOG"
check "without certificates the agent exits 2 naming the file (rc=$rc)" \
    sh -c "[ $rc -eq 2 ] && echo \"\$1\" | grep -q '/etc/gpusoc/tls/'" _ "$out"

# ---------------------------------------------------------------- mTLS, simulated GPUs
HOSTNAME_T=gpu-test-01
check "dev PKI: gpusoc-agent pki init" in_root /usr/bin/gpusoc-agent pki init --out /root/pki --agent "$HOSTNAME_T" --console ops
in_root sh -c "install -o root -g gpusoc -m 0644 /root/pki/agents/$HOSTNAME_T.pem /etc/gpusoc/tls/agent.pem &&
               install -o root -g gpusoc -m 0640 /root/pki/agents/$HOSTNAME_T.key /etc/gpusoc/tls/agent.key &&
               install -o root -g gpusoc -m 0644 /root/pki/console-ca.pem /etc/gpusoc/tls/console-ca.pem" >>"$LOG" 2>&1
start_agent "$WORK/agent-mtls.log" env GPUSOC_AGENT_HOST=$HOSTNAME_T GPUSOC_AGENT_LISTEN=127.0.0.1:17443 \
    GPUSOC_AGENT_SIMULATE_GPUS=2 /usr/bin/gpusoc-agent run --config /etc/gpusoc/agent.toml
sleep 3
check "agent (as gpusoc, packaged config, mTLS) is serving" grep -q "serving $HOSTNAME_T" "$WORK/agent-mtls.log"
check "SDK socket /run/gpusoc/agent.sock is created" test -S "$ROOT/run/gpusoc/agent.sock"
# Training steps from the host while the console watches, through the chroot's socket
# (the kernel stamps pid/uid on each datagram, so this exercises the real path).
if python3 -c "import agent.sdk" 2>/dev/null; then
    (cd "$REPO" && GPUSOC_AGENT_SOCKET="$ROOT/run/gpusoc/agent.sock" python3 -c "
import time
from agent import sdk
sdk.init(job_id='deb-test')
for s in range(40):
    sdk.log(step=s, loss=2.0 - s / 100)
    sdk.flush()
    time.sleep(0.2)") >>"$LOG" 2>&1 &
    PIDS+=($!)
fi
watch_out=$(timeout 20 chroot "$ROOT" /usr/bin/gpusoc-agent watch 127.0.0.1:17443 --ca /root/pki/agent-ca.pem \
    --cert /root/pki/consoles/ops.pem --key /root/pki/consoles/ops.key --count 3 2>&1)
echo "$watch_out" >>"$LOG"
check "console certificate can watch the agent's frames" sh -c 'echo "$1" | grep -q "SIMULATED '"$HOSTNAME_T"'"' _ "$watch_out"
check "training records from the SDK arrive in frames" sh -c 'echo "$1" | grep -q "job=deb-test"' _ "$watch_out"
no_cert=$(timeout 20 chroot "$ROOT" /usr/bin/gpusoc-agent watch 127.0.0.1:17443 --insecure --count 1 2>&1); rc=$?
echo "$no_cert" >>"$LOG"
check "a plaintext client is refused (rc=$rc)" sh -c '[ "$1" -ne 0 ] && ! echo "$2" | grep -q SIMULATED' _ "$rc" "$no_cert"
pki_other=$(timeout 20 chroot "$ROOT" sh -c '/usr/bin/gpusoc-agent pki init --out /root/pki-rogue --agent x --console mallory >/dev/null &&
    /usr/bin/gpusoc-agent watch 127.0.0.1:17443 --ca /root/pki/agent-ca.pem --cert /root/pki-rogue/consoles/mallory.pem \
    --key /root/pki-rogue/consoles/mallory.key --count 1' 2>&1); rc=$?
echo "$pki_other" >>"$LOG"
check "a console certificate from another CA is refused (rc=$rc)" sh -c '[ "$1" -ne 0 ] && ! echo "$2" | grep -q SIMULATED' _ "$rc" "$pki_other"
stop_agents

# ---------------------------------------------------------------- Prometheus /metrics
start_agent "$WORK/agent-metrics.log" env GPUSOC_AGENT_METRICS_LISTEN=127.0.0.1:17445 GPUSOC_AGENT_INSECURE=1 \
    GPUSOC_AGENT_SIMULATE_GPUS=2 /usr/bin/gpusoc-agent run --config /etc/gpusoc/agent.toml --listen 127.0.0.1:17444
sleep 3
if grep -q "unknown environment variable GPUSOC_AGENT_METRICS_LISTEN" "$WORK/agent-metrics.log"; then
    say "SKIP  /metrics: this build's config has no metrics_listen yet"
elif ! grep -q "Prometheus metrics on" "$WORK/agent-metrics.log"; then
    say "SKIP  /metrics: metrics_listen accepted but no exporter started (agent/main.py wiring pending)"
else
    metrics=$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:17445/metrics', timeout=5).read().decode())" 2>&1)
    echo "$metrics" | grep -E '^(DCGM_FI_DEV_GPU_UTIL|gpusoc_agent_info)' >>"$LOG"
    check "/metrics serves DCGM_FI_DEV_GPU_UTIL labelled simulated=\"true\"" \
        sh -c 'echo "$1" | grep -E "^DCGM_FI_DEV_GPU_UTIL\{" | grep -q "simulated=\"true\""' _ "$metrics"
fi
stop_agents

# ---------------------------------------------------------------- upgrade keeps edits, purge cleans up
echo '# local edit' >>"$ROOT/etc/gpusoc/agent.toml"
check "reinstall (upgrade path) keeps a locally edited conffile" \
    sh -c "chroot '$ROOT' dpkg -i --force-confdef --force-confold /tmp/gpusoc-agent.deb && grep -q '# local edit' '$ROOT/etc/gpusoc/agent.toml'"
check "dpkg -r removes the program" sh -c "chroot '$ROOT' dpkg -r gpusoc-agent && [ ! -e '$ROOT/usr/bin/gpusoc-agent' ] && [ ! -e '$ROOT/opt/gpusoc-agent' ]"
check "dpkg -P purges config and state" sh -c "chroot '$ROOT' dpkg -P gpusoc-agent && [ ! -e '$ROOT/etc/gpusoc/agent.toml' ] && [ ! -e '$ROOT/var/lib/gpusoc' ]"

# ---------------------------------------------------------------- the unit under real systemd
if [ "${SYSTEMD_TEST:-1}" = 1 ] && command -v systemd-nspawn >/dev/null; then
    SCACHE=$WORK/bookworm-systemd.tar
    SROOT=$WORK/nspawn
    if [ ! -f "$SCACHE" ]; then
        say "== preparing a bookworm root with systemd (first run; cached in $SCACHE)"
        rm -rf "$SROOT" && mkdir -p "$SROOT" && tar -C "$SROOT" -xf "$CACHE"
        cp /etc/resolv.conf "$SROOT/etc/resolv.conf"
        mount -t proc proc "$SROOT/proc"
        chroot "$SROOT" sh -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends systemd systemd-sysv dbus" >>"$WORK/debootstrap.log" 2>&1
        umount "$SROOT/proc"
        tar -C "$SROOT" -cf "$SCACHE" .
    fi
    rm -rf "$SROOT" && mkdir -p "$SROOT" && tar -C "$SROOT" -xf "$SCACHE"
    echo "$HOSTNAME_T" >"$SROOT/etc/hostname"
    cp "$DEB" "$SROOT/root/gpusoc-agent.deb"
    systemd-nspawn -D "$SROOT" --register=no --keep-unit -b >"$WORK/nspawn.log" 2>&1 </dev/null &
    NSPAWN_PID=$!
    PIDS+=("$NSPAWN_PID")
    leader=""
    for _ in $(seq 60); do
        leader=$(ps -o pid= --ppid "$NSPAWN_PID" | head -1 | tr -d ' ')
        if [ -n "$leader" ] && nsenter -t "$leader" -m -u -i -n -p systemctl is-system-running 2>/dev/null \
            | grep -qE "running|degraded"; then break; fi
        sleep 1
    done
    in_ct() { nsenter -t "$leader" -m -u -i -n -p "$@"; }
    check "container boots systemd" in_ct systemctl is-system-running
    check "dpkg -i under systemd: enabled, not started without certificates" \
        sh -c "$(declare -f in_ct); leader=$leader; in_ct dpkg -i /root/gpusoc-agent.deb && in_ct systemctl is-enabled gpusoc-agent && ! in_ct systemctl is-active gpusoc-agent"
    in_ct sh -c "gpusoc-agent pki init --out /root/pki --agent $HOSTNAME_T --console ops >/dev/null &&
        install -o root -g gpusoc -m 0644 /root/pki/agents/$HOSTNAME_T.pem /etc/gpusoc/tls/agent.pem &&
        install -o root -g gpusoc -m 0640 /root/pki/agents/$HOSTNAME_T.key /etc/gpusoc/tls/agent.key &&
        install -o root -g gpusoc -m 0644 /root/pki/console-ca.pem /etc/gpusoc/tls/console-ca.pem &&
        echo GPUSOC_AGENT_SIMULATE_GPUS=2 >>/etc/default/gpusoc-agent &&
        mknod -m 0666 /dev/nvidiactl c 195 255 && mknod -m 0666 /dev/nvidia0 c 195 0 &&
        mkdir -p /etc/systemd/system/gpusoc-agent.service.d &&
        printf '[Service]\nExecStartPost=/bin/sh -c \"dd if=/dev/nvidia0 of=/dev/null count=1; touch /etc/gpusoc/probe; touch /var/lib/gpusoc/probe && echo state-writable\"\n' \
            >/etc/systemd/system/gpusoc-agent.service.d/probe.conf &&
        systemctl daemon-reload && systemctl start gpusoc-agent" >>"$LOG" 2>&1
    sleep 4
    journal=$(in_ct journalctl -u gpusoc-agent --no-pager -o cat 2>&1); echo "$journal" >>"$LOG"
    status=$(in_ct sh -c 'grep -E "^(Uid|CapEff|NoNewPrivs|Seccomp):" /proc/$(systemctl show -p MainPID --value gpusoc-agent)/status' 2>&1)
    echo "$status" >>"$LOG"
    check "hardened unit runs the agent (mTLS, simulated GPUs)" sh -c 'echo "$1" | grep -q "serving '"$HOSTNAME_T"'"' _ "$journal"
    check "no capabilities, no_new_privs, seccomp filter" \
        sh -c 'echo "$1" | grep -q "CapEff:.0000000000000000" && echo "$1" | grep -q "NoNewPrivs:.1" && echo "$1" | grep -q "Seccomp:.2"' _ "$status"
    check "GPU device node openable in the sandbox (ENXIO from the absent driver, not EPERM)" \
        sh -c 'echo "$1" | grep -q "/dev/nvidia0.: No such device or address"' _ "$journal"
    check "/etc read-only, state writable in the sandbox" \
        sh -c 'echo "$1" | grep -q "/etc/gpusoc/probe.: Read-only file system" && echo "$1" | grep -q state-writable' _ "$journal"
    watch_ct=$(in_ct timeout 20 gpusoc-agent watch 127.0.0.1:7443 --ca /root/pki/agent-ca.pem \
        --cert /root/pki/consoles/ops.pem --key /root/pki/consoles/ops.key --count 1 2>&1); echo "$watch_ct" >>"$LOG"
    check "console certificate can watch the systemd-run agent" sh -c 'echo "$1" | grep -q SIMULATED' _ "$watch_ct"
    online=$(in_ct systemd-analyze security gpusoc-agent --no-pager 2>&1 | sed -n 's/.*exposure level for gpusoc-agent.service: \([0-9.]*\).*/\1/p')
    say "      systemd-analyze security (online, running unit): ${online:-?}"
    check "online exposure <= 4.0" awk -v s="${online:-99}" 'BEGIN { exit !(s <= 4.0) }'
    # The opt-in response profile (root, bounded capabilities) from the package's examples.
    in_ct sh -c "rm -rf /etc/systemd/system/gpusoc-agent.service.d && install -D -m 0644 \
        /usr/share/doc/gpusoc-agent/examples/response-actions.conf \
        /etc/systemd/system/gpusoc-agent.service.d/response-actions.conf &&
        systemctl daemon-reload && systemctl restart gpusoc-agent" >>"$LOG" 2>&1
    sleep 4
    status=$(in_ct sh -c 'grep -E "^(Uid|CapBnd):" /proc/$(systemctl show -p MainPID --value gpusoc-agent)/status' 2>&1)
    echo "$status" >>"$LOG"
    check "response profile: agent runs as root with only the listed capabilities" \
        sh -c 'echo "$1" | grep -q "Uid:.0" && echo "$1" | grep -q "CapBnd:.00000000000800ef"' _ "$status"
    resp=$(in_ct systemd-analyze security gpusoc-agent --no-pager 2>&1 | sed -n 's/.*exposure level for gpusoc-agent.service: \([0-9.]*\).*/\1/p')
    say "      systemd-analyze security with response-actions.conf: ${resp:-?}"
    check "dpkg -P under systemd stops and disables the service" \
        sh -c "$(declare -f in_ct); leader=$leader; in_ct dpkg -P gpusoc-agent && ! in_ct systemctl is-active gpusoc-agent && ! in_ct test -e /etc/systemd/system/multi-user.target.wants/gpusoc-agent.service"
    in_ct systemctl poweroff >/dev/null 2>&1
    wait "$NSPAWN_PID" 2>/dev/null
else
    say "SKIP  systemd phase (SYSTEMD_TEST=0 or no systemd-nspawn)"
fi

say "== $failures failure(s); transcript: $LOG"
exit "$failures"
