# multifd-migrate: one image for migrate-src, migrate-dst and migrate-ctl
# (compose.yaml runs it twice, as "src" and "dst").
#
#   docker build -t multifd-migrate .
#
# Offline build (no registry, no index): pass a locally made base image and a
# wheelhouse placed in the build context as ./wheels (it must also hold the build
# backend, setuptools and wheel, since pip builds the project in isolation):
#
#   docker build --build-arg BASE_IMAGE=local/python:3.11 \
#                --build-arg PIP_OPTIONS="--no-index --find-links /wheels" .
#
# scripts/make-base-image.sh makes such a base (multifd-migrate-base:bookworm, Debian
# bookworm's python3.11 in /opt/venv); scripts/compose-e2e.sh builds the wheelhouse on
# the host, runs this build with --network none and then compose.yaml end to end.
#
# The image has no ENTRYPOINT: the command is the program to run.  Without one it
# prints the help of the three programs.
#
# Only the classic Dockerfile syntax is used (no BuildKit-only features), so the
# legacy builder that docker-compose v1 uses by default builds it too.

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PIP_OPTIONS=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The whole build context (minus .dockerignore) so that an optional ./wheels
# directory comes along without a COPY that would fail when it is absent.
COPY . /src

# /wheels is where PIP_OPTIONS may point --find-links; the source and the
# wheelhouse are removed once installed.  /run/migrate holds the QMP sockets and
# belongs to the unprivileged uid the daemons run as.
RUN set -e; \
    if [ -d /src/wheels ]; then ln -s /src/wheels /wheels; fi; \
    python3 -m pip install ${PIP_OPTIONS} /src; \
    rm -rf /src /wheels; \
    mkdir -p /run/migrate; \
    chown 10001:10001 /run/migrate; \
    chmod 0750 /run/migrate; \
    migrate-src --help >/dev/null; \
    migrate-dst --help >/dev/null; \
    migrate-ctl --help >/dev/null

# No user account needed: a bare non-root uid/gid.  `docker compose exec` and the
# healthchecks run as the same uid, so they can reach the sockets.
USER 10001:10001
WORKDIR /run/migrate

CMD ["sh", "-c", "migrate-src --help; echo; migrate-dst --help; echo; migrate-ctl --help"]
