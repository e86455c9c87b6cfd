#!/bin/sh
# gpusoc-agent preinst: the service account must exist before dpkg/rpm unpack files owned by it.
set -e
if ! getent group gpusoc >/dev/null; then
    groupadd --system gpusoc
fi
if ! getent passwd gpusoc >/dev/null; then
    useradd --system --gid gpusoc --home-dir /var/lib/gpusoc --no-create-home \
        --shell /usr/sbin/nologin --comment "gpusoc agent" gpusoc
fi
exit 0
