#!/bin/sh
# gpusoc-agent prerm: stop the service on removal (not on upgrade, where postinst restarts it).
set -e
case "$1" in
    remove|0)
        if [ -d /run/systemd/system ]; then
            systemctl stop gpusoc-agent.service >/dev/null 2>&1 || true
            systemctl disable gpusoc-agent.service >/dev/null 2>&1 || true
        fi
        ;;
esac
exit 0
