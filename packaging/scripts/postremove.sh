#!/bin/sh
# gpusoc-agent postrm: purge deletes state and logs. The gpusoc account and /etc/gpusoc/tls
# (certificates you installed) stay, as Debian policy asks for accounts and admin-provided files.
set -e
case "$1" in
    purge)
        rm -rf /var/lib/gpusoc /var/log/gpusoc
        ;;
esac
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
