# The chart's dev PostgreSQL, built offline from the base with Debian's postgresql-15: the
# interface of the official `postgres` image that the chart relies on (uid/gid 999, the
# POSTGRES_USER / POSTGRES_PASSWORD / PGDATA environment, initdb on first start, password
# auth over TCP, pg_isready and psql on PATH), nothing more.
ARG BASE_IMAGE=cqrs-stack-base:bookworm
FROM ${BASE_IMAGE}
# No cluster at install time (the entry point makes one in PGDATA), no service start.
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d \
 && groupadd --system --gid 999 postgres \
 && useradd --system --uid 999 --gid 999 --home-dir /var/lib/postgresql --shell /bin/sh postgres \
 && mkdir -p /etc/postgresql-common \
 && echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.conf \
 && apt-get -q update \
 && DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-install-recommends install postgresql-15 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 && rm -f /usr/sbin/policy-rc.d \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R 999:999 /var/lib/postgresql /var/run/postgresql
COPY postgresql-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data
USER 999:999
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
