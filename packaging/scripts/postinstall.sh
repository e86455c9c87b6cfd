#!/bin/sh
# gpusoc-agent postinst: permissions on config and state, then enable the service. It starts only
# once the agent's certificate is in place, so a fresh install does not crash-loop on missing TLS.
set -e

# deb: "configure" [old-version]; rpm: 1 = install, 2 = upgrade.
case "$1" in
    configure) [ -n "$2" ] && action=upgrade || action=install ;;
    1) action=install ;;
    2) action=upgrade ;;
    *) exit 0 ;;
esac

# Config: readable by the agent's group only (it names key paths; keys themselves are 0640 root:gpusoc).
chown root:gpusoc /etc/gpusoc /etc/gpusoc/agent.toml
chmod 0750 /etc/gpusoc
chmod 0640 /etc/gpusoc/agent.toml
install -d -o root -g gpusoc -m 0750 /etc/gpusoc/tls
# State and logs: systemd also creates these (StateDirectory=, LogsDirectory=); made here for
# hosts that run the agent without systemd.
install -d -o gpusoc -g gpusoc -m 0750 /var/lib/gpusoc /var/log/gpusoc
# NVIDIA device nodes are 0666 by default; hosts that set NVreg_DeviceFileGID use group video.
if getent group video >/dev/null && ! id -nG gpusoc | grep -qw video; then
    usermod -a -G video gpusoc || true
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
    if [ "$action" = install ]; then
        systemctl enable gpusoc-agent.service >/dev/null || true
    fi
    if [ "$action" = upgrade ]; then
        systemctl try-restart gpusoc-agent.service || true  # running before: runs the new version
    elif [ -s /etc/gpusoc/tls/agent.pem ] && [ -s /etc/gpusoc/tls/agent.key ]; then
        systemctl start gpusoc-agent.service || true
    else
        echo "gpusoc-agent: enabled, not started: put the certificate in /etc/gpusoc/tls/" \
            "(agent.pem, agent.key, console-ca.pem; see /usr/share/doc/gpusoc-agent/install-agent.md)," \
            "then: systemctl start gpusoc-agent"
    fi
fi
exit 0
