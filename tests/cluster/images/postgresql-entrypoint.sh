#!/bin/sh
# What the official postgres image's entry point does for the chart: on first start,
# initdb in $PGDATA with superuser $POSTGRES_USER and password $POSTGRES_PASSWORD (scram
# over TCP from anywhere, trust on the local socket), the database $POSTGRES_USER, then
# run the server listening on every address.
set -eu
if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set (the chart sets it from its Secret)}"
    user=${POSTGRES_USER:-postgres}
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb -D "$PGDATA" --username="$user" --pwfile="$pwfile" --encoding=UTF8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    if [ "$user" != postgres ]; then
        echo "CREATE DATABASE \"$user\"" | postgres --single -D "$PGDATA" postgres >/dev/null
    fi
    echo "entrypoint: initialised $PGDATA (superuser $user)"
fi
exec "$@"
