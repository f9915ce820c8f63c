# The base of our kind node image, built offline: what kind's images/base/Dockerfile makes,
# from the offline Debian base and Debian's packages instead of registry images and GitHub
# downloads. kind's own files (entrypoint, containerd config, systemd units) come from kind's
# module source, the one `make dev-tools` builds kind from (tests/images/kind/build-node.sh
# copies them into files/); crictl is built from Go sources (build-node-bins.sh).
#
#   systemd, iptables, conntrack, ...   Debian bookworm, as kind's base installs from Debian
#   containerd 1.6, runc 1.1            Debian's containerd, runc (kind builds its own)
#   CNI host-local, loopback, ptp, portmap   Debian's containernetworking-plugins
ARG BASE_IMAGE=cqrs-stack-base:bookworm
FROM ${BASE_IMAGE}

# Packages first (kind's list, and Debian's containerd, runc, CNI plugins), so that kind's
# files below replace the packages' defaults (containerd's config, its unit).
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      systemd systemd-sysv dbus \
      conntrack iptables nftables iproute2 ethtool util-linux mount kmod \
      libseccomp2 pigz e2fsprogs \
      bash ca-certificates curl jq procps \
      containerd runc containernetworking-plugins \
      >/tmp/apt.log 2>&1 || { tail -40 /tmp/apt.log; exit 1; }; \
    rm -f /tmp/apt.log && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/*

COPY files/usr/local/bin/ /usr/local/bin/
COPY files/kind/ /kind/
COPY files/etc/ /etc/
COPY crictl /usr/local/bin/crictl

# The trimming of systemd units as in kind's base; Debian's containerd, runc and CNI plugins
# where kind's units and manifests look for them.
RUN chmod 0755 /usr/local/bin/* /kind /kind/bin /kind/bin/* \
 && find /lib/systemd/system/sysinit.target.wants/ -name "systemd-tmpfiles-setup.service" -delete \
 && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \
      /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \
      /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/* \
 && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \
 && ln -sf /usr/bin/containerd /usr/local/bin/containerd \
 && printf '%s\n' '#!/bin/sh' \
      '# containerd 1.6 ctr has no "info" (1.7+), which kind runs to see containerd ready.' \
      'if [ "${1:-}" = info ]; then exec /usr/bin/ctr version; fi' \
      'exec /usr/bin/ctr "$@"' >/usr/local/bin/ctr \
 && chmod 0755 /usr/local/bin/ctr \
 && ln -sf /usr/bin/containerd-shim-runc-v2 /usr/local/bin/containerd-shim-runc-v2 \
 && mkdir -p /opt/cni/bin \
 && cp /usr/lib/cni/host-local /usr/lib/cni/loopback /usr/lib/cni/ptp /usr/lib/cni/portmap /opt/cni/bin/ \
 && ctr oci spec \
      | jq '.hooks.createContainer[.hooks.createContainer| length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \
      | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json \
 && containerd --version && runc --version && crictl --version

# Where root lacks CAP_SYS_RESOURCE (tests/images/runc-bounded), nothing may lower an OOM
# score: containerd's unit must not ask for -999 (systemd would refuse to start it), and the
# CRI plugin clamps pods' scores to its own, as kind does for rootless nodes.
RUN sed -i '/^OOMScoreAdjust=/d' /etc/systemd/system/containerd.service \
 && sed -i 's/^  restrict_oom_score_adj = false/  restrict_oom_score_adj = true/' /etc/containerd/config.toml \
 && grep -q 'restrict_oom_score_adj = true' /etc/containerd/config.toml \
 && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \
 && systemctl mask systemd-binfmt.service \
 && mkdir -p /etc/kubernetes/manifests

ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]
