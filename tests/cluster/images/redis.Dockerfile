# The chart's dev Redis, built offline from the base with Debian's redis-server (7.0): the
# interface of the official `redis` image that the chart relies on (uid/gid 999,
# redis-server and redis-cli on PATH, sh for the readiness probe); the chart mounts its
# own /etc/redis/redis.conf and runs `redis-server /etc/redis/redis.conf`.
ARG BASE_IMAGE=cqrs-stack-base:bookworm
FROM ${BASE_IMAGE}
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d \
 && groupadd --system --gid 999 redis \
 && useradd --system --uid 999 --gid 999 --home-dir /data --shell /usr/sbin/nologin redis \
 && apt-get -q update \
 && DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-install-recommends install redis-server \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 && rm -f /usr/sbin/policy-rc.d \
 && mkdir -p /data && chown 999:999 /data
WORKDIR /data
USER 999:999
EXPOSE 6379
CMD ["redis-server"]
